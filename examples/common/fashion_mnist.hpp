// Fashion-MNIST loader (Debian's dataset-fashion-mnist: gzip-compressed IDX files in
// /usr/share/datasets/fashion-mnist). Shared by examples and the real-data tests.
//
// IDX: big-endian magic (0x00000803 images, 0x00000801 labels), dimension sizes, then bytes.
// Errors (missing file, bad magic, truncated data, label/image count mismatch) throw
// std::runtime_error naming the file and what was wrong. Links zlib (-lz).
#pragma once

#include <zlib.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace lowmem::data {

inline const char* fashion_mnist_default_dir = "/usr/share/datasets/fashion-mnist";

struct image_set {
  std::vector<float> images;        // n × 784, pixels scaled to [0, 1], row-major
  std::vector<std::uint8_t> labels; // n, 0..9
  std::size_t count = 0;
  static constexpr std::size_t rows = 28, cols = 28, pixels = 784, classes = 10;
};

namespace detail {
inline std::vector<std::uint8_t> read_gzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f)
    throw std::runtime_error("fashion_mnist: cannot open '" + path +
                             "' (install Debian's dataset-fashion-mnist)");
  std::vector<std::uint8_t> out;
  std::uint8_t buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
  int err = 0;
  const char* msg = gzerror(f, &err);
  gzclose(f);
  if (n < 0 || (err != Z_OK && err != Z_STREAM_END))
    throw std::runtime_error("fashion_mnist: corrupt gzip data in '" + path + "': " + msg);
  return out;
}
inline std::uint32_t be32(const std::vector<std::uint8_t>& b, std::size_t at) {
  return std::uint32_t(b[at]) << 24 | std::uint32_t(b[at + 1]) << 16 |
         std::uint32_t(b[at + 2]) << 8 | std::uint32_t(b[at + 3]);
}
} // namespace detail

/// Loads the "train" or "t10k" split; `limit` > 0 keeps only the first `limit` examples.
inline image_set load_fashion_mnist(const std::string& split, std::size_t limit = 0,
                                    const std::string& dir = fashion_mnist_default_dir) {
  const std::string ipath = dir + "/" + split + "-images-idx3-ubyte.gz";
  const std::string lpath = dir + "/" + split + "-labels-idx1-ubyte.gz";
  const auto ib = detail::read_gzip(ipath);
  const auto lb = detail::read_gzip(lpath);
  if (ib.size() < 16 || detail::be32(ib, 0) != 0x803)
    throw std::runtime_error("fashion_mnist: '" + ipath + "' is not an IDX image file");
  if (lb.size() < 8 || detail::be32(lb, 0) != 0x801)
    throw std::runtime_error("fashion_mnist: '" + lpath + "' is not an IDX label file");
  const std::size_t n = detail::be32(ib, 4), r = detail::be32(ib, 8), c = detail::be32(ib, 12);
  if (r != 28 || c != 28)
    throw std::runtime_error("fashion_mnist: '" + ipath + "' has images of " + std::to_string(r) +
                             "x" + std::to_string(c) + ", expected 28x28");
  if (detail::be32(lb, 4) != n)
    throw std::runtime_error("fashion_mnist: " + std::to_string(n) + " images but " +
                             std::to_string(detail::be32(lb, 4)) + " labels");
  if (ib.size() < 16 + n * 784 || lb.size() < 8 + n)
    throw std::runtime_error("fashion_mnist: '" + ipath + "' or its labels are truncated");
  image_set s;
  s.count = limit > 0 && limit < n ? limit : n;
  s.images.resize(s.count * 784);
  s.labels.assign(lb.begin() + 8, lb.begin() + 8 + std::ptrdiff_t(s.count));
  for (std::size_t i = 0; i < s.count * 784; ++i) s.images[i] = float(ib[16 + i]) / 255.0f;
  for (auto l : s.labels)
    if (l > 9) throw std::runtime_error("fashion_mnist: label out of range in '" + lpath + "'");
  return s;
}

} // namespace lowmem::data
