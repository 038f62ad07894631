// lowmem/core/memory_hooks.hpp — allocator hooks for lowmem::memory. Include in EXACTLY ONE
// translation unit of a program (it defines global functions). See core/memory.hpp.
//
// Always replaced: every form of global operator new/delete (sized, aligned, nothrow), routed to
// malloc / aligned_alloc. In non-sanitizer glibc builds also malloc, calloc, realloc, free,
// aligned_alloc, memalign and posix_memalign (forwarding to glibc's __libc_* entry points), so
// Eigen's and the C library's allocations count. Under ASan/TSan (which own malloc) only the
// operator new/delete level is counted: define LOWMEM_SANITIZER_BUILD or build with
// -fsanitize=address, which this header detects.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <malloc.h>
#include <new>

#include "memory.hpp"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#ifndef LOWMEM_SANITIZER_BUILD
#define LOWMEM_SANITIZER_BUILD 1
#endif
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#ifndef LOWMEM_SANITIZER_BUILD
#define LOWMEM_SANITIZER_BUILD 1
#endif
#endif
#endif

#if !defined(LOWMEM_SANITIZER_BUILD) && defined(__GLIBC__)
#define LOWMEM_HOOK_MALLOC 1
#else
#define LOWMEM_HOOK_MALLOC 0
#endif

namespace lowmem::memory::detail {
inline const bool hooks_registered = [] {
  global().hooks_installed.store(true);
  global().malloc_hooked.store(LOWMEM_HOOK_MALLOC != 0);
  return true;
}();
} // namespace lowmem::memory::detail

#if LOWMEM_HOOK_MALLOC
extern "C" {
// glibc declares the C allocation functions noexcept (__THROW) in C++; the definitions match.
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void __libc_free(void*);
void* __libc_memalign(std::size_t, std::size_t);

void* malloc(std::size_t n) noexcept {
  void* p = __libc_malloc(n);
  if (p) lowmem::memory::detail::on_allocate(static_cast<std::int64_t>(malloc_usable_size(p)));
  return p;
}
void* calloc(std::size_t n, std::size_t s) noexcept {
  void* p = __libc_calloc(n, s);
  if (p) lowmem::memory::detail::on_allocate(static_cast<std::int64_t>(malloc_usable_size(p)));
  return p;
}
void free(void* p) noexcept {
  if (!p) return;
  lowmem::memory::detail::on_free(static_cast<std::int64_t>(malloc_usable_size(p)));
  __libc_free(p);
}
void* realloc(void* p, std::size_t n) noexcept {
  const std::int64_t old = p ? static_cast<std::int64_t>(malloc_usable_size(p)) : 0;
  void* q = __libc_realloc(p, n);
  if (q) {
    lowmem::memory::detail::on_free(old);
    lowmem::memory::detail::on_allocate(static_cast<std::int64_t>(malloc_usable_size(q)));
  } else if (n == 0 && p) {
    lowmem::memory::detail::on_free(old);
  }
  return q;
}
void* memalign(std::size_t a, std::size_t n) noexcept {
  void* p = __libc_memalign(a, n);
  if (p) lowmem::memory::detail::on_allocate(static_cast<std::int64_t>(malloc_usable_size(p)));
  return p;
}
void* aligned_alloc(std::size_t a, std::size_t n) noexcept { return memalign(a, n); }
int posix_memalign(void** out, std::size_t a, std::size_t n) noexcept {
  void* p = memalign(a, n);
  if (!p) return 12; // ENOMEM
  *out = p;
  return 0;
}
} // extern "C"
#endif

namespace lowmem::memory::detail {
inline void* hooked_new(std::size_t n, std::size_t align) {
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t)
                ? std::aligned_alloc(align, (n + align - 1) / align * align)
                : std::malloc(n);
  if (!p) throw std::bad_alloc();
#if !LOWMEM_HOOK_MALLOC
  on_allocate(static_cast<std::int64_t>(malloc_usable_size(p)));
#endif
  return p;
}
inline void hooked_delete(void* p) noexcept {
  if (!p) return;
#if !LOWMEM_HOOK_MALLOC
  on_free(static_cast<std::int64_t>(malloc_usable_size(p)));
#endif
  std::free(p);
}
} // namespace lowmem::memory::detail

void* operator new(std::size_t n) { return lowmem::memory::detail::hooked_new(n, 0); }
void* operator new[](std::size_t n) { return lowmem::memory::detail::hooked_new(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) {
  return lowmem::memory::detail::hooked_new(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return lowmem::memory::detail::hooked_new(n, static_cast<std::size_t>(a));
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return lowmem::memory::detail::hooked_new(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return lowmem::memory::detail::hooked_new(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return lowmem::memory::detail::hooked_new(n, static_cast<std::size_t>(a));
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return lowmem::memory::detail::hooked_new(n, static_cast<std::size_t>(a));
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { lowmem::memory::detail::hooked_delete(p); }
void operator delete[](void* p) noexcept { lowmem::memory::detail::hooked_delete(p); }
void operator delete(void* p, std::size_t) noexcept { lowmem::memory::detail::hooked_delete(p); }
void operator delete[](void* p, std::size_t) noexcept { lowmem::memory::detail::hooked_delete(p); }
void operator delete(void* p, std::align_val_t) noexcept {
  lowmem::memory::detail::hooked_delete(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
  lowmem::memory::detail::hooked_delete(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  lowmem::memory::detail::hooked_delete(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
  lowmem::memory::detail::hooked_delete(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  lowmem::memory::detail::hooked_delete(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  lowmem::memory::detail::hooked_delete(p);
}
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  lowmem::memory::detail::hooked_delete(p);
}
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  lowmem::memory::detail::hooked_delete(p);
}
