// lowmem/lowmem.hpp — umbrella header: every family header, nothing else.
#pragma once

#include "core.hpp"
#include "adapters.hpp"
