// libFuzzer target for lowmem::quant::deserialize_qweight. Built with -DLOWMEM_BUILD_FUZZERS=ON
// and clang (tests/fuzz/CMakeLists.txt); CI fuzzes it for 60 s (.ci/run).
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
