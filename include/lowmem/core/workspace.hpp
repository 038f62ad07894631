// lowmem/core/workspace.hpp — the workspace convention.
//
// A kernel that needs scratch exposes `<op>_workspace_bytes(shape...)` and takes a `workspace`
// (caller-owned bytes). Inside, scratch is carved with `take<T>(count)`: a bump allocator,
// 64-byte aligned, that never touches the heap. The same carving sequence run on a
// `workspace_planner` gives the byte count, so the size function and the kernel cannot disagree:
//
//   template <class WS> void carve(WS& ws, index_t n) { ws.template take<float>(n); ... }
//   size_t op_workspace_bytes(n) { workspace_planner p; carve(p, n); return p.bytes(); }
//
// `owned_workspace` is the convenience for callers who allocate once, outside their loops.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "errors.hpp"

namespace lowmem {

inline constexpr std::size_t workspace_alignment = 64; // one cache line, one AVX-512 register

namespace detail {
constexpr std::size_t align_up(std::size_t n, std::size_t a) noexcept {
  return (n + a - 1) / a * a;
}
} // namespace detail

/// Counts the bytes a carving sequence needs (worst case for any base alignment).
class workspace_planner {
public:
  template <class T> T* take(std::size_t count) {
    bytes_ = detail::align_up(bytes_, workspace_alignment) + count * sizeof(T);
    return nullptr;
  }
  /// Bytes to allocate: the carved total plus slack for aligning an arbitrary base; 0 when the
  /// sequence takes nothing (so a kernel without scratch accepts an empty workspace).
  std::size_t bytes() const noexcept { return bytes_ == 0 ? 0 : bytes_ + workspace_alignment; }

private:
  std::size_t bytes_ = 0;
};

/// Caller-owned scratch bytes, carved by a bump pointer. Never allocates.
class workspace {
public:
  workspace() = default;
  workspace(void* data, std::size_t bytes) noexcept
      : base_(static_cast<unsigned char*>(data)), size_(bytes) {}

  /// Next `count` T's, 64-byte aligned. Throws lowmem::invalid_argument when the caller's
  /// workspace is too small (kernels check the full size at entry, so this is a safety net).
  template <class T> T* take(std::size_t count) {
    if (count == 0) return reinterpret_cast<T*>(base_ + used_); // never dereferenced
    auto addr = reinterpret_cast<std::uintptr_t>(base_) + used_;
    std::size_t pad = detail::align_up(addr, workspace_alignment) - addr;
    std::size_t need = pad + count * sizeof(T);
    if (used_ + need > size_)
      detail::throw_invalid("workspace::take", "workspace",
                            ">= " + detail::to_text(used_ + need) + " bytes",
                            detail::to_text(size_) + " bytes");
    T* p = reinterpret_cast<T*>(base_ + used_ + pad);
    used_ += need;
    return p;
  }
  void reset() noexcept { used_ = 0; }
  std::size_t size() const noexcept { return size_; }
  std::size_t used() const noexcept { return used_; }
  void* data() const noexcept { return base_; }

private:
  unsigned char* base_ = nullptr;
  std::size_t size_ = 0;
  std::size_t used_ = 0;
};

/// Validates at a public entry that a workspace holds at least `needed` bytes.
inline void require_workspace(const char* function, const workspace& ws, std::size_t needed) {
  if (ws.size() - ws.used() < needed)
    detail::throw_invalid(function, "workspace", ">= " + detail::to_text(needed) + " free bytes",
                          detail::to_text(ws.size() - ws.used()) + " free bytes");
}

/// Heap-backed workspace for callers: allocate once, reuse across calls.
class owned_workspace {
public:
  explicit owned_workspace(std::size_t bytes = 0) { resize(bytes); }
  /// Grows (never shrinks) the buffer; the only allocation point.
  void resize(std::size_t bytes) {
    if (bytes <= capacity_) return;
    buffer_.reset(
        static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(workspace_alignment))));
    capacity_ = bytes;
  }
  workspace get() noexcept { return workspace(buffer_.get(), capacity_); }
  std::size_t capacity() const noexcept { return capacity_; }

private:
  struct deleter {
    void operator()(unsigned char* p) const noexcept {
      ::operator delete(p, std::align_val_t(workspace_alignment));
    }
  };
  std::unique_ptr<unsigned char, deleter> buffer_;
  std::size_t capacity_ = 0;
};

} // namespace lowmem
