// lowmem/core/errors.hpp — the library's one exception type and the validation helpers every
// public entry uses.
//
// Policy: every public function validates shapes, strides, sizes and hyper-parameters at entry,
// before it writes anything, and throws lowmem::invalid_argument whose message names the
// function, the argument, the expected and the actual value:
//   "lowmem::lora_forward: argument 'A.cols' expected 4096 (== x.cols), got 4095"
// A call that throws leaves every buffer as it was. Hot loops carry no checks.
#pragma once

#include <cmath>
#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>

namespace lowmem {

/// Thrown on bad input by every public entry, before anything is written.
class invalid_argument : public std::invalid_argument {
public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <class T> std::string to_text(const T& v) {
  std::ostringstream s;
  s.precision(9);
  s << v;
  return s.str();
}

/// Builds the canonical message and throws.
[[noreturn]] inline void throw_invalid(const char* function, const char* argument,
                                       const std::string& expected, const std::string& actual) {
  throw invalid_argument(std::string("lowmem::") + function + ": argument '" + argument +
                         "' expected " + expected + ", got " + actual);
}

} // namespace detail

// ---- validation helpers: each throws lowmem::invalid_argument naming function and argument ----

/// Requires `cond`; `expected` describes the condition ("> 0", "a multiple of 64", ...).
/// Nothing is formatted or allocated unless the check fails (pass a string literal, not a
/// std::string built in the call, to keep passing checks allocation-free in hot paths).
template <class E, class T>
inline void require(bool cond, const char* function, const char* argument, const E& expected,
                    const T& actual) {
  if (!cond)
    detail::throw_invalid(function, argument, detail::to_text(expected), detail::to_text(actual));
}

/// Requires actual == expected (sizes, extents, ranks).
template <class T, class U>
inline void require_equal(const char* function, const char* argument, const T& expected,
                          const U& actual) {
  if (!(actual == expected))
    detail::throw_invalid(function, argument, detail::to_text(expected), detail::to_text(actual));
}

/// Requires actual > 0 (and, for floating point, finite).
template <class T>
inline void require_positive(const char* function, const char* argument, const T& actual) {
  bool ok = actual > T(0);
  if constexpr (std::is_floating_point<T>::value) ok = ok && std::isfinite(actual);
  if (!ok) detail::throw_invalid(function, argument, "> 0", detail::to_text(actual));
}

/// Requires actual >= 0 (and finite for floating point).
template <class T>
inline void require_non_negative(const char* function, const char* argument, const T& actual) {
  bool ok = actual >= T(0);
  if constexpr (std::is_floating_point<T>::value) ok = ok && std::isfinite(actual);
  if (!ok) detail::throw_invalid(function, argument, ">= 0", detail::to_text(actual));
}

/// Requires lo <= actual <= hi (closed interval).
template <class T>
inline void require_in_closed(const char* function, const char* argument, const T& lo, const T& hi,
                              const T& actual) {
  if (!(actual >= lo && actual <= hi))
    detail::throw_invalid(function, argument,
                          "in [" + detail::to_text(lo) + ", " + detail::to_text(hi) + "]",
                          detail::to_text(actual));
}

/// Requires lo <= actual < hi (half-open interval), e.g. Adam betas in [0, 1).
template <class T>
inline void require_in_half_open(const char* function, const char* argument, const T& lo,
                                 const T& hi, const T& actual) {
  if (!(actual >= lo && actual < hi))
    detail::throw_invalid(function, argument,
                          "in [" + detail::to_text(lo) + ", " + detail::to_text(hi) + ")",
                          detail::to_text(actual));
}

/// Requires actual % divisor == 0 (block sizes, group sizes, packed lengths).
template <class T>
inline void require_multiple_of(const char* function, const char* argument, const T& divisor,
                                const T& actual) {
  if (divisor == T(0) || actual % divisor != T(0))
    detail::throw_invalid(function, argument, "a multiple of " + detail::to_text(divisor),
                          detail::to_text(actual));
}

/// Requires a non-null pointer whenever the extent it covers is non-empty.
inline void require_data(const char* function, const char* argument, const void* ptr,
                         std::size_t count) {
  if (count != 0 && ptr == nullptr)
    detail::throw_invalid(function, argument,
                          "non-null data for " + detail::to_text(count) + " elements", "nullptr");
}

} // namespace lowmem
