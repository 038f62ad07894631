// lowmem/quant/serialize.hpp — a self-describing byte format for a quantized weight, and a decoder
// that treats its input as untrusted: every field is checked against the bytes actually present and
// against the other fields before anything is copied; malformed input throws
// lowmem::invalid_argument naming the offending field (never reads out of bounds).
//
// Layout "LMQ1" (all integers little-endian):
//   offset  size  field
//   0       4     magic "LMQ1"
//   4       1     format (quant::weight_format: 0 int8_sym, 1 int8_asym, 2 int4_sym, 3 int4_asym,
//                 4 nf4, 5 fp4)
//   5       3     reserved, must be 0
//   8       8     rows   (int64, 0 <= rows <= 2^31)
//   16      8     cols   (int64, 0 <= cols <= 2^31, rows·cols <= 2^40)
//   24      8     block  (int64, > 0, divides cols)
//   32      ...   codes  (rows·cols bytes for int8, ceil(rows·cols/2) for 4-bit; odd count: last
//                 low nibble 0)
//   ...     4·nb  scales (float32, nb = rows·cols/block; finite, >= 0 for NF4/FP4 and symmetric)
//   ...     4·nb  zeros  (asymmetric formats only: integers in [0, 2^bits − 1])
// and nothing after. Total size is a function of the header, and must match exactly.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../core/errors.hpp"
#include "linear.hpp"

namespace lowmem::quant {

namespace detail {
inline void put_u64(std::vector<std::uint8_t>& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(std::uint8_t(v >> (8 * i)));
}
inline std::uint64_t get_u64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= std::uint64_t(p[i]) << (8 * i);
  return v;
}
inline void put_f32(std::vector<std::uint8_t>& out, float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  for (int i = 0; i < 4; ++i) out.push_back(std::uint8_t(u >> (8 * i)));
}
inline float get_f32(const std::uint8_t* p) {
  const std::uint32_t u = std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 |
                          std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bool is_asymmetric(weight_format f) {
  return f == weight_format::int8_asym || f == weight_format::int4_asym;
}
inline bool is_int8(weight_format f) {
  return f == weight_format::int8_sym || f == weight_format::int8_asym;
}
constexpr std::size_t qheader_bytes = 32;
} // namespace detail

/// Encodes a quantized weight into the "LMQ1" layout (allocates the returned buffer).
inline std::vector<std::uint8_t> serialize_qweight(const qweight& w) {
  detail::require_qweight("serialize_qweight", w);
  const std::size_t n = std::size_t(w.rows * w.cols);
  const std::size_t nb = n / std::size_t(w.block);
  const std::size_t ncodes = detail::is_int8(w.format) ? n : (n + 1) / 2;
  std::vector<std::uint8_t> out;
  out.reserve(detail::qheader_bytes + ncodes + 8 * nb);
  out.insert(out.end(), {'L', 'M', 'Q', '1', std::uint8_t(w.format), 0, 0, 0});
  detail::put_u64(out, std::uint64_t(w.rows));
  detail::put_u64(out, std::uint64_t(w.cols));
  detail::put_u64(out, std::uint64_t(w.block));
  out.insert(out.end(), w.codes, w.codes + ncodes);
  for (std::size_t b = 0; b < nb; ++b) detail::put_f32(out, w.scales[b]);
  if (detail::is_asymmetric(w.format))
    for (std::size_t b = 0; b < nb; ++b) detail::put_f32(out, w.zeros[b]);
  return out;
}

/// Decodes untrusted "LMQ1" bytes into an owning qweight_storage. Throws lowmem::invalid_argument
/// ("lowmem::deserialize_qweight: argument '<field>' expected ..., got ...") on any malformed
/// input: short or trailing bytes, bad magic/format/reserved bytes, sizes out of range, block not
/// dividing cols, non-finite or negative scales, zero points not integral or out of range,
/// a non-zero padding nibble. Reads only bytes[0, size). Allocates the result.
inline qweight_storage deserialize_qweight(const std::uint8_t* bytes, std::size_t size) {
  const char* fn = "deserialize_qweight";
  if (size > 0) require_data(fn, "bytes", bytes, size);
  require(size >= detail::qheader_bytes, fn, "size", ">= 32 bytes (header)", size);
  require(std::memcmp(bytes, "LMQ1", 4) == 0, fn, "magic", "\"LMQ1\"",
          std::string(reinterpret_cast<const char*>(bytes), 4));
  require(bytes[4] <= 5, fn, "format", "0..5", int(bytes[4]));
  require(bytes[5] == 0 && bytes[6] == 0 && bytes[7] == 0, fn, "reserved", "0",
          int(bytes[5] | bytes[6] | bytes[7]));
  const weight_format f = weight_format(bytes[4]);
  const std::uint64_t rows = detail::get_u64(bytes + 8), cols = detail::get_u64(bytes + 16),
                      block = detail::get_u64(bytes + 24);
  const std::uint64_t lim = std::uint64_t(1) << 31;
  require(rows <= lim, fn, "rows", "<= 2^31", rows);
  require(cols <= lim, fn, "cols", "<= 2^31", cols);
  require(block >= 1 && block <= lim, fn, "block", "in [1, 2^31]", block);
  require(cols % block == 0, fn, "block", "a divisor of cols (" + std::to_string(cols) + ")",
          block);
  const std::uint64_t n = rows * cols; // <= 2^62: no overflow
  require(n <= (std::uint64_t(1) << 40), fn, "rows * cols", "<= 2^40", n);
  const std::uint64_t nb = n / block;
  const std::uint64_t ncodes = detail::is_int8(f) ? n : (n + 1) / 2;
  const std::uint64_t nzeros = detail::is_asymmetric(f) ? nb : 0;
  // every term <= 2^42: the sum cannot overflow
  const std::uint64_t expected = detail::qheader_bytes + ncodes + 4 * nb + 4 * nzeros;
  require(std::uint64_t(size) == expected, fn, "size",
          std::to_string(expected) + " bytes for this header", size);
  const std::uint8_t* codes = bytes + detail::qheader_bytes;
  const std::uint8_t* sc = codes + ncodes;
  const std::uint8_t* zs = sc + 4 * nb;
  if (!detail::is_int8(f) && n % 2 == 1)
    require((codes[ncodes - 1] & 0x0F) == 0, fn, "codes", "a zero padding nibble",
            int(codes[ncodes - 1] & 0x0F));
  for (std::uint64_t b = 0; b < nb; ++b) {
    const float s = detail::get_f32(sc + 4 * b);
    if (!(std::isfinite(s) && s >= 0))
      lowmem::detail::throw_invalid(fn, "scales", "finite and >= 0",
                                    lowmem::detail::to_text(s) + " at block " + std::to_string(b));
  }
  const float zmax = f == weight_format::int8_asym ? 255.0f : 15.0f;
  for (std::uint64_t b = 0; b < nzeros; ++b) {
    const float z = detail::get_f32(zs + 4 * b);
    if (!(z >= 0 && z <= zmax && std::nearbyint(z) == z))
      lowmem::detail::throw_invalid(fn, "zeros",
                                    "an integer in [0, " + lowmem::detail::to_text(zmax) + "]",
                                    lowmem::detail::to_text(z) + " at block " + std::to_string(b));
  }
  qweight_storage q;
  q.format = f, q.rows = index_t(rows), q.cols = index_t(cols), q.block = index_t(block);
  q.codes.assign(codes, codes + ncodes);
  q.scales.resize(std::size_t(nb));
  for (std::uint64_t b = 0; b < nb; ++b) q.scales[std::size_t(b)] = detail::get_f32(sc + 4 * b);
  q.zeros.resize(std::size_t(nzeros));
  for (std::uint64_t b = 0; b < nzeros; ++b) q.zeros[std::size_t(b)] = detail::get_f32(zs + 4 * b);
  return q;
}

} // namespace lowmem::quant
