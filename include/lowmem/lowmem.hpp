// lowmem/lowmem.hpp — umbrella header: every family header, nothing else.
#pragma once

#include "adapters.hpp"
#include "attention.hpp"
#include "core.hpp"
#include "optimizers.hpp"
#include "quant.hpp"
#include "zeroth_order.hpp"
