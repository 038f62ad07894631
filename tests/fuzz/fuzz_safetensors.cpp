// libFuzzer target: arbitrary bytes through the safetensors parser. Every input must either parse
// (and then every tensor view must lie inside the input) or throw lowmem::io::format_error; ASan
// catches any out-of-bounds read. Build: -DLOWMEM_BUILD_FUZZERS=ON with clang.
#include <lowmem/io/safetensors.hpp>

#include <cstdint>
#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto f = lowmem::io::safetensors_file::from_bytes(data, size, "fuzz");
    std::size_t sum = 0;
    for (const auto& t : f.tensors()) {
      if (t.data < data || t.data + t.bytes > data + size) std::abort();
      for (std::size_t i = 0; i < t.bytes; ++i) sum += t.data[i]; // touch every byte
    }
    volatile std::size_t sink = sum;
    (void)sink;
  } catch (const lowmem::io::format_error&) {
  }
  return 0;
}
