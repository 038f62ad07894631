// lowmem/io/safetensors.hpp — read and write the safetensors checkpoint format.
//
// Format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header
// length N, N bytes of UTF-8 JSON, then the data buffer. The JSON maps tensor names to
//   {"dtype": "F32"|"BF16"|"F16"|"I8"|"U8"|..., "shape": [d0, d1, ...], "data_offsets": [b, e]}
// with offsets relative to the start of the data buffer, plus an optional "__metadata__" object
// of string → string. Tensors are raw little-endian, row-major.
//
// Reading is zero-copy: `safetensors_file::open` memory-maps the file and every tensor is a view
// into the mapping. Files are hostile input: the parser checks, before exposing anything, that
// the header length fits the file (and a 100 MiB cap), the JSON parses and its strings are valid
// UTF-8, every entry has a known dtype, a shape of non-negative extents whose element count
// times the dtype size neither overflows nor differs from its byte range, and that the byte
// ranges lie inside the buffer, do not overlap and tile it without holes (the reference
// implementation's rule). Violations throw lowmem::io::format_error naming the file and the
// problem; no byte outside the mapping is ever read. Writing builds the header with the same
// rules (offsets in insertion order, 8-byte-aligned data start as the reference writer pads).
//
// Needs nlohmann/json (Debian: nlohmann-json3-dev), header-only.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>
#include <vector>

#include "../core/errors.hpp"

namespace lowmem::io {

/// A malformed or unreadable checkpoint (not a programming error: the file is input).
class format_error : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

enum class dtype { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean };

/// Bytes per element.
inline std::size_t dtype_size(dtype t) noexcept {
  switch (t) {
  case dtype::f64:
  case dtype::i64:
    return 8;
  case dtype::f32:
  case dtype::i32:
    return 4;
  case dtype::f16:
  case dtype::bf16:
  case dtype::i16:
    return 2;
  case dtype::i8:
  case dtype::u8:
  case dtype::boolean:
    return 1;
  }
  return 0;
}
/// The safetensors dtype string ("F32", "BF16", ...).
inline const char* dtype_name(dtype t) noexcept {
  switch (t) {
  case dtype::f64:
    return "F64";
  case dtype::f32:
    return "F32";
  case dtype::f16:
    return "F16";
  case dtype::bf16:
    return "BF16";
  case dtype::i64:
    return "I64";
  case dtype::i32:
    return "I32";
  case dtype::i16:
    return "I16";
  case dtype::i8:
    return "I8";
  case dtype::u8:
    return "U8";
  case dtype::boolean:
    return "BOOL";
  }
  return "?";
}
inline bool parse_dtype(const std::string& s, dtype& out) noexcept {
  static const std::pair<const char*, dtype> table[] = {
      {"F64", dtype::f64}, {"F32", dtype::f32},     {"F16", dtype::f16}, {"BF16", dtype::bf16},
      {"I64", dtype::i64}, {"I32", dtype::i32},     {"I16", dtype::i16}, {"I8", dtype::i8},
      {"U8", dtype::u8},   {"BOOL", dtype::boolean}};
  for (const auto& [name, t] : table)
    if (s == name) {
      out = t;
      return true;
    }
  return false;
}

/// One tensor of a parsed file: a view into the file's bytes.
struct tensor_view {
  std::string name;
  io::dtype dtype = dtype::f32;
  std::vector<std::int64_t> shape;
  const unsigned char* data = nullptr; // not necessarily aligned: use memcpy or check
  std::size_t bytes = 0;

  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

inline constexpr std::uint64_t max_header_bytes = 100ull << 20;

/// A parsed safetensors buffer (memory-mapped file or caller bytes that outlive it).
class safetensors_file {
public:
  /// Memory-maps and validates `path`. Throws format_error.
  static safetensors_file open(const std::string& path) {
    safetensors_file f;
    f.source_ = path;
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw format_error("safetensors: cannot open '" + path + "'");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw format_error("safetensors: cannot stat '" + path + "'");
    }
    const std::size_t size = std::size_t(st.st_size);
    if (size > 0) {
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      ::close(fd);
      if (p == MAP_FAILED) throw format_error("safetensors: cannot map '" + path + "'");
      f.mapping_ = std::shared_ptr<void>(p, [size](void* q) { ::munmap(q, size); });
    } else {
      ::close(fd);
    }
    f.parse(static_cast<const unsigned char*>(f.mapping_.get()), size);
    return f;
  }

  /// Validates caller-owned bytes (which must outlive the result). Throws format_error.
  static safetensors_file from_bytes(const void* data, std::size_t size,
                                     const std::string& source = "<memory>") {
    safetensors_file f;
    f.source_ = source;
    f.parse(static_cast<const unsigned char*>(data), size);
    return f;
  }

  const std::vector<tensor_view>& tensors() const noexcept { return tensors_; }
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  bool contains(const std::string& name) const noexcept { return find(name) != nullptr; }

  /// The tensor called `name`; throws format_error when absent.
  const tensor_view& at(const std::string& name) const {
    const tensor_view* t = find(name);
    if (!t) throw format_error("safetensors: '" + source_ + "' has no tensor '" + name + "'");
    return *t;
  }

  /// Copies tensor `name` into `out` (numel elements of T), checking dtype and element count.
  template <class T>
  void copy_to(const std::string& name, dtype expected, T* out, std::size_t count) const {
    const tensor_view& t = at(name);
    if (t.dtype != expected || sizeof(T) != dtype_size(expected))
      throw format_error("safetensors: tensor '" + name + "' in '" + source_ + "' has dtype " +
                         dtype_name(t.dtype) + ", expected " + dtype_name(expected));
    if (std::size_t(t.numel()) != count)
      throw format_error("safetensors: tensor '" + name + "' has " + std::to_string(t.numel()) +
                         " elements, expected " + std::to_string(count));
    if (count) std::memcpy(out, t.data, t.bytes);
  }

private:
  const tensor_view* find(const std::string& name) const noexcept {
    for (const auto& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw format_error("safetensors: '" + source_ + "': " + what);
  }

  void parse(const unsigned char* p, std::size_t size) {
    if (size < 8)
      fail("file of " + std::to_string(size) + " bytes is shorter than the 8-byte header length");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | p[i];
    if (n > max_header_bytes)
      fail("header length " + std::to_string(n) + " exceeds the 100 MiB limit");
    if (n > size - 8)
      fail("header length " + std::to_string(n) + " runs past the end of the file (" +
           std::to_string(size) + " bytes)");
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(p + 8, p + 8 + n); // validates UTF-8 in strings
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) fail("header is not a JSON object");
    const unsigned char* buffer = p + 8 + n;
    const std::uint64_t buffer_size = size - 8 - n;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") {
        if (!it->is_object()) fail("__metadata__ is not an object");
        for (auto m = it->begin(); m != it->end(); ++m) {
          if (!m->is_string()) fail("__metadata__ value for '" + m.key() + "' is not a string");
          metadata_[m.key()] = m->get<std::string>();
        }
        continue;
      }
      const auto& e = *it;
      const std::string& name = it.key();
      if (!e.is_object()) fail("entry '" + name + "' is not an object");
      tensor_view t;
      t.name = name;
      if (!e.contains("dtype") || !e["dtype"].is_string())
        fail("entry '" + name + "' has no dtype string");
      if (!parse_dtype(e["dtype"].get<std::string>(), t.dtype))
        fail("entry '" + name + "' has unknown dtype '" + e["dtype"].get<std::string>() + "'");
      if (!e.contains("shape") || !e["shape"].is_array())
        fail("entry '" + name + "' has no shape array");
      std::uint64_t numel = 1;
      for (const auto& d : e["shape"]) {
        if (!d.is_number_unsigned())
          fail("entry '" + name + "' has a shape extent that is not a non-negative integer");
        const std::uint64_t v = d.get<std::uint64_t>();
        if (v != 0 && numel > (std::uint64_t(1) << 62) / v)
          fail("entry '" + name + "' has a shape whose element count overflows");
        numel *= v;
        t.shape.push_back(std::int64_t(v));
      }
      if (!e.contains("data_offsets") || !e["data_offsets"].is_array() ||
          e["data_offsets"].size() != 2 || !e["data_offsets"][0].is_number_unsigned() ||
          !e["data_offsets"][1].is_number_unsigned())
        fail("entry '" + name + "' has no [begin, end] data_offsets of non-negative integers");
      const std::uint64_t b = e["data_offsets"][0].get<std::uint64_t>();
      const std::uint64_t en = e["data_offsets"][1].get<std::uint64_t>();
      if (b > en || en > buffer_size)
        fail("entry '" + name + "' has data_offsets [" + std::to_string(b) + ", " +
             std::to_string(en) + "] outside the data buffer of " + std::to_string(buffer_size) +
             " bytes");
      const std::uint64_t expected_bytes = numel * dtype_size(t.dtype);
      if (en - b != expected_bytes)
        fail("entry '" + name + "' holds " + std::to_string(en - b) +
             " bytes but shape x dtype needs " + std::to_string(expected_bytes));
      t.data = buffer + b;
      t.bytes = std::size_t(en - b);
      ranges.emplace_back(b, en);
      tensors_.push_back(std::move(t));
    }
    std::sort(ranges.begin(), ranges.end());
    std::uint64_t cursor = 0;
    for (const auto& [b, en] : ranges) {
      if (b < cursor) fail("tensor byte ranges overlap at offset " + std::to_string(b));
      if (b > cursor) fail("tensor byte ranges leave a hole at offset " + std::to_string(cursor));
      cursor = en;
    }
    if (cursor != buffer_size)
      fail("data buffer has " + std::to_string(buffer_size - cursor) +
           " trailing bytes not covered by any tensor");
  }

  std::string source_;
  std::shared_ptr<void> mapping_;
  std::vector<tensor_view> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// A tensor to write: `bytes` = numel(shape) · dtype_size(dtype) bytes at `data`.
struct tensor_to_write {
  std::string name;
  io::dtype dtype = dtype::f32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
};

/// Serialises tensors (in the given order) and metadata to safetensors bytes.
/// Throws lowmem::invalid_argument on an empty or duplicate name, a negative extent, a name that
/// is "__metadata__", or null data for a non-empty tensor — before producing anything.
inline std::vector<unsigned char>
to_safetensors_bytes(const std::vector<tensor_to_write>& tensors,
                     const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  std::vector<std::uint64_t> sizes;
  for (const auto& t : tensors) {
    require(!t.name.empty() && t.name != "__metadata__", "save_safetensors", "tensor name",
            "a non-empty name other than __metadata__", "'" + t.name + "'");
    require(!header.contains(t.name), "save_safetensors", "tensor name", "unique names",
            "duplicate '" + t.name + "'");
    std::uint64_t numel = 1;
    for (auto d : t.shape) {
      require_non_negative("save_safetensors", "shape extent", d);
      numel *= std::uint64_t(d);
    }
    const std::uint64_t bytes = numel * dtype_size(t.dtype);
    require_data("save_safetensors", "tensor data", t.data, std::size_t(bytes));
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    sizes.push_back(bytes);
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' '); // data starts 8-byte aligned
  std::vector<unsigned char> out(8 + text.size() + offset);
  const std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = static_cast<unsigned char>(n >> (8 * i));
  std::memcpy(out.data() + 8, text.data(), text.size());
  unsigned char* dst = out.data() + 8 + text.size();
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    if (sizes[i]) std::memcpy(dst, tensors[i].data, sizes[i]);
    dst += sizes[i];
  }
  return out;
}

/// Writes tensors and metadata to `path` (via a temporary file renamed into place, so a failed
/// write never leaves a truncated checkpoint). Throws format_error on I/O failure.
inline void save_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  const std::vector<unsigned char> bytes = to_safetensors_bytes(tensors, metadata);
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw format_error("safetensors: cannot create '" + tmp + "'");
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  if (std::fclose(f) != 0 || !ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw format_error("safetensors: cannot write '" + path + "'");
  }
}

} // namespace lowmem::io
