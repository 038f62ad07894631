// Serialized quantized weights: round trip, and the decoder rejects malformed (untrusted) bytes
// with a clear error: truncation at every length, corrupted fields, random byte flips.
#include <catch2/catch.hpp>
#include <lowmem/core.hpp>
#include <lowmem/quant/serialize.hpp>

#include <string>
#include <vector>

#include "reference/common.hpp"

using namespace lowmem;
using namespace lowmem::quant;

namespace {
qweight_storage make(weight_format f, index_t rows, index_t cols, index_t block) {
  RowMatrixXf W(rows, cols);
  const auto v = ref::uniform_data(static_cast<std::size_t>(rows * cols), 1);
  std::copy(v.begin(), v.end(), W.data());
  return qweight_storage::quantize(W, f, block);
}
std::string error_of(const std::vector<std::uint8_t>& b) {
  try {
    deserialize_qweight(b.data(), b.size());
  } catch (const lowmem::invalid_argument& e) {
    return e.what();
  }
  return "";
}
} // namespace

TEST_CASE("serialize / deserialize round trip for every format", "[quant][serialize]") {
  for (weight_format f :
       {weight_format::int8_sym, weight_format::int8_asym, weight_format::int4_sym,
        weight_format::int4_asym, weight_format::nf4, weight_format::fp4}) {
    for (auto [rows, cols, block] :
         {std::tuple<index_t, index_t, index_t>{4, 64, 32}, {3, 5, 5}, {0, 64, 64}, {1, 1, 1}}) {
      const auto q = make(f, rows, cols, block);
      const auto bytes = serialize_qweight(q.view());
      const auto d = deserialize_qweight(bytes.data(), bytes.size());
      CHECK(d.format == f);
      CHECK(d.rows == rows);
      CHECK(d.cols == cols);
      CHECK(d.block == block);
      CHECK(d.codes == q.codes);
      CHECK(d.scales == q.scales);
      CHECK(d.zeros == q.zeros);
      CHECK(serialize_qweight(d.view()) == bytes);
    }
  }
}

TEST_CASE("deserialize rejects malformed input with a clear error", "[quant][serialize][errors]") {
  const auto q = make(weight_format::int4_asym, 3, 5, 5); // odd element count, zeros present
  const auto good = serialize_qweight(q.view());
  // every truncation and an extra byte
  for (std::size_t len = 0; len < good.size(); ++len) {
    std::vector<std::uint8_t> b(good.begin(), good.begin() + std::ptrdiff_t(len));
    REQUIRE(error_of(b).find("lowmem::deserialize_qweight") != std::string::npos);
  }
  auto b = good;
  b.push_back(0);
  CHECK(error_of(b).find("'size'") != std::string::npos);
  // field corruptions, each with its own message
  auto corrupt = [&](std::size_t off, std::uint8_t v) {
    auto c = good;
    c[off] = v;
    return error_of(c);
  };
  CHECK(corrupt(0, 'X').find("'magic'") != std::string::npos);
  CHECK(corrupt(4, 9).find("'format'") != std::string::npos);
  CHECK(corrupt(6, 1).find("'reserved'") != std::string::npos);
  CHECK(corrupt(15, 0x80).find("'rows'") != std::string::npos);
  CHECK(corrupt(24, 3).find("'block'") != std::string::npos); // 3 does not divide 5
  CHECK(corrupt(24, 0).find("'block'") != std::string::npos);
  CHECK(corrupt(32 + 7, 0x0F).find("'codes'") != std::string::npos);      // padding nibble (15 el.)
  CHECK(corrupt(32 + 8 + 3, 0xFF).find("'scales'") != std::string::npos); // NaN scale
  CHECK(corrupt(32 + 8 + 12 + 2, 0x01).find("'zeros'") != std::string::npos); // non-integer
  // size fields that would overflow naive arithmetic
  auto big = good;
  for (int i = 0; i < 8; ++i) big[8 + i] = big[16 + i] = 0xFF;
  CHECK(error_of(big).find("'rows'") != std::string::npos);
}

TEST_CASE("deserialize survives random corruption (mini fuzz)", "[quant][serialize][fuzz]") {
  const auto q = make(weight_format::nf4, 4, 64, 64);
  const auto good = serialize_qweight(q.view());
  random::stream s{5, 6};
  int accepted = 0, rejected = 0;
  for (std::uint64_t t = 0; t < 3000; ++t) {
    auto b = good;
    const int flips = 1 + int(s.bits(4 * t) % 4);
    for (int k = 0; k < flips; ++k) {
      const std::size_t pos = s.bits(4 * t + 1 + std::uint64_t(k)) % b.size();
      b[pos] ^= std::uint8_t(1u << (s.bits(4 * t + 3) % 8));
    }
    if (s.bits(4 * t + 2) % 5 == 0) b.resize(s.bits(4 * t + 2) % b.size());
    try {
      const auto d = deserialize_qweight(b.data(), b.size());
      std::vector<float> out(static_cast<std::size_t>(d.rows * d.cols));
      RowMatrixXf m(d.rows, d.cols);
      dequantize_weight(d.view(), m); // a decoded weight is always usable
      ++accepted;
    } catch (const lowmem::invalid_argument&) {
      ++rejected;
    }
  }
  CHECK(accepted > 0);
  CHECK(rejected > 0);
}
