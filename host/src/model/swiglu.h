// SwiGLU's elementwise work on the fused gate/up output `gu = [g | u]`, each way, shared by the
// C++ nodes that run it (swiglu.cpp, lora_block.cpp): through the fused kernel of ftx-kernels
// when `kernel` (see src/gpu/kernels.cpp), else libtorch's ops.
#pragma once

#include "../gpu/kernels.h"

#include <ATen/ATen.h>

namespace ftx {

inline at::Tensor swiglu_gate(const at::Tensor& gu) { return gu.narrow(-1, 0, gu.size(-1) / 2); }
inline at::Tensor swiglu_up(const at::Tensor& gu) { return gu.narrow(-1, gu.size(-1) / 2, gu.size(-1) / 2); }

// h = silu(g)·u.
inline at::Tensor swiglu_forward(const at::Tensor& gu, bool kernel) {
  return kernel ? swiglu_kernel_forward(gu) : at::silu(swiglu_gate(gu)).mul_(swiglu_up(gu));
}

// dL/dgu from dL/dh, silu recomputed from gu: d/dg = silu'(g)·u·dh (libtorch's silu_backward),
// d/du = silu(g)·dh.
inline at::Tensor swiglu_grad(const at::Tensor& gu, const at::Tensor& dh, bool kernel) {
  if (kernel) return swiglu_kernel_backward(gu, dh);
  auto dgu = at::empty_like(gu, at::MemoryFormat::Contiguous);
  auto g = swiglu_gate(gu), u = swiglu_up(gu);
  auto dg = dgu.narrow(-1, 0, g.size(-1));
  auto du = dgu.narrow(-1, g.size(-1), g.size(-1));
  at::silu_backward_out(dg, dh * u, g);
  at::mul_out(du, dh, at::silu(g));
  return dgu;
}

}  // namespace ftx
