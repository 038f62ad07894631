// lowmem/lowmem.hpp — umbrella header: every family header, nothing else.
#pragma once

#include "core.hpp"
#include "attention.hpp"
#include "zeroth_order.hpp"
#include "quant.hpp"
#include "optimizers.hpp"
#include "adapters.hpp"
