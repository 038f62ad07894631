// libFuzzer target for lowmem::quant::deserialize_qweight (NOT part of the CMake build: the test
// glob is tests/test_*.cpp, non-recursive). Build and run by hand:
//   clang++-14 -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -Iinclude \
//     -I/usr/include/eigen3 tests/fuzz/fuzz_quant_deserialize.cpp -o build/fuzz_quant_deserialize
//   ./build/fuzz_quant_deserialize -max_total_time=60
// Every input must either decode into a weight that dequantizes cleanly or throw
// lowmem::invalid_argument; anything else (crash, sanitizer report, other exception) is a bug.
#include <lowmem/quant/serialize.hpp>

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto q = lowmem::quant::deserialize_qweight(data, size);
    if (q.rows * q.cols <= (1 << 20)) {
      lowmem::RowMatrixXf out(q.rows, q.cols);
      lowmem::quant::dequantize_weight(q.view(), out);
    }
  } catch (const lowmem::invalid_argument&) {
  }
  return 0;
}
