// lowmem/core/tensor.hpp — strided N-d views and Eigen::Tensor interop.
//
// Kernels over batched data (attention's [B, H, N, d], a KV cache) take a `tensor_view<T, Rank>`:
// a pointer, extents and element strides, so one kernel serves the contiguous head-major layout
// [B, H, N, d] and the token-major layout [B, N, H, d] (PyTorch's (B, N, H, d) before a transpose)
// without copies. Row-major Eigen::TensorMap / Tensor convert to a view with `view_of_tensor`
// (this header does not include the heavy Tensor module: include it yourself to use Tensors).
#pragma once

#include <array>
#include <cstddef>
#include <string>
#include <type_traits>

#include "eigen.hpp"
#include "errors.hpp"

namespace lowmem {

template <class T, int Rank> struct tensor_view {
  T* data = nullptr;
  std::array<index_t, Rank> extent{};
  std::array<index_t, Rank> stride{}; // in elements

  template <class... I> T& operator()(I... i) const noexcept {
    static_assert(sizeof...(I) == Rank, "one index per dimension");
    const index_t idx[] = {index_t(i)...};
    index_t off = 0;
    for (int k = 0; k < Rank; ++k) off += idx[k] * stride[std::size_t(k)];
    return data[off];
  }
  index_t size() const noexcept {
    index_t n = 1;
    for (auto e : extent) n *= e;
    return n;
  }
  /// True when the last dimension is contiguous (stride 1), the layout every lowmem kernel needs.
  bool inner_contiguous() const noexcept { return Rank == 0 || stride[Rank - 1] == 1; }
};

/// A dense row-major view: strides from the extents.
template <class T, int Rank>
tensor_view<T, Rank> dense_view(T* data, const std::array<index_t, Rank>& extent) {
  tensor_view<T, Rank> v{data, extent, {}};
  index_t s = 1;
  for (int k = Rank - 1; k >= 0; --k) {
    v.stride[std::size_t(k)] = s;
    s *= extent[std::size_t(k)];
  }
  return v;
}

/// A [B, H, N, d] view of token-major storage [B, N, H, d] (no copy: strides permuted).
template <class T>
tensor_view<T, 4> token_major_view(T* data, index_t B, index_t N, index_t H, index_t d) {
  return {data, {B, H, N, d}, {N * H * d, d, H * d, 1}};
}

/// View of a row-major Eigen::TensorMap / Tensor (which must have direct access).
template <class TensorType> auto view_of_tensor(TensorType& t) {
  static_assert(static_cast<int>(TensorType::Layout) == static_cast<int>(Eigen::RowMajor),
                "lowmem: row-major Eigen tensors required");
  using Scalar = std::remove_reference_t<decltype(*t.data())>;
  constexpr int Rank = TensorType::NumIndices;
  std::array<index_t, Rank> extent{};
  for (int k = 0; k < Rank; ++k) extent[std::size_t(k)] = index_t(t.dimension(k));
  return dense_view<Scalar, Rank>(t.data(), extent);
}

/// Validates a view at a public entry: extents >= 0, inner dimension contiguous, data present.
template <class T, int Rank>
void require_tensor(const char* function, const char* argument, const tensor_view<T, Rank>& v) {
  for (int k = 0; k < Rank; ++k) require_non_negative(function, argument, v.extent[std::size_t(k)]);
  if (!v.inner_contiguous())
    detail::throw_invalid(function, argument, "unit stride in the last dimension",
                          "stride " + detail::to_text(v.stride[Rank - 1]));
  require_data(function, argument, v.data, std::size_t(v.size()));
}

/// Validates a view's extents against expected ones, naming the first mismatching dimension.
template <class T, int Rank>
void require_extents(const char* function, const char* argument, const tensor_view<T, Rank>& v,
                     const std::array<index_t, Rank>& expected) {
  for (int k = 0; k < Rank; ++k)
    if (v.extent[std::size_t(k)] != expected[std::size_t(k)])
      detail::throw_invalid(
          function, (std::string(argument) + ".extent[" + std::to_string(k) + "]").c_str(),
          detail::to_text(expected[std::size_t(k)]), detail::to_text(v.extent[std::size_t(k)]));
  require_tensor(function, argument, v);
}

} // namespace lowmem
