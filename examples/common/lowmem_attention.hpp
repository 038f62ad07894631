// The demo's attention backend on lowmem's tiled attention (include/lowmem/attention.hpp): saves
// only the per-row log-sum-exp (B·H·N floats) instead of the N×N probabilities, and never forms a
// score matrix in forward or backward.
#pragma once

#include <lowmem/attention.hpp>

#include <memory>

#include "layers.hpp"

namespace demo {

inline attention_backend lowmem_attention() {
  attention_backend a;
  a.name = "lowmem tiled";
  a.saved_floats = [](const attention_shape& s) { return std::size_t(s.B * s.H * s.N); };
  // backward scratch: lowmem's per-thread tiles, carved from the model's arena (in floats)
  a.workspace_floats = [](const attention_shape& s) {
    return lowmem::attention_workspace_bytes(s.d) / sizeof(float) + 1;
  };
  // forward scratch: one buffer owned by the backend, grown on first use (not per call)
  auto fwd_ws = std::make_shared<lowmem::owned_workspace>();
  a.forward = [fwd_ws](const attention_shape& s, const float* q, const float* k, const float* v,
                       float* o, float* lse) {
    lowmem::attention_options opt;
    opt.scale = s.scale;
    fwd_ws->resize(lowmem::attention_workspace_bytes(s.d));
    lowmem::attention_forward(lowmem::attention_bhnd(q, s.B, s.H, s.N, s.d),
                              lowmem::attention_bhnd(k, s.B, s.H, s.N, s.d),
                              lowmem::attention_bhnd(v, s.B, s.H, s.N, s.d),
                              lowmem::attention_bhnd(o, s.B, s.H, s.N, s.d), lse, opt,
                              fwd_ws->get());
  };
  a.backward = [](const attention_shape& s, const float* q, const float* k, const float* v,
                  const float* o, const float* d_o, const float* lse, float* dq, float* dk,
                  float* dv, float* ws) {
    lowmem::attention_options opt;
    opt.scale = s.scale;
    const std::size_t bytes = lowmem::attention_workspace_bytes(s.d);
    lowmem::attention_backward(lowmem::attention_bhnd(q, s.B, s.H, s.N, s.d),
                               lowmem::attention_bhnd(k, s.B, s.H, s.N, s.d),
                               lowmem::attention_bhnd(v, s.B, s.H, s.N, s.d),
                               lowmem::attention_bhnd(o, s.B, s.H, s.N, s.d),
                               lowmem::attention_bhnd(d_o, s.B, s.H, s.N, s.d), lse,
                               lowmem::attention_bhnd(dq, s.B, s.H, s.N, s.d),
                               lowmem::attention_bhnd(dk, s.B, s.H, s.N, s.d),
                               lowmem::attention_bhnd(dv, s.B, s.H, s.N, s.d), opt,
                               lowmem::workspace(ws, bytes));
  };
  return a;
}

} // namespace demo
