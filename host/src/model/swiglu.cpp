// SwiGLU as one autograd node that saves only the fused gate/up projection `gu = [g | u]`
// (and, for a LoRA down projection, the adapter's A): `h = silu(g) * u` and `xa = h Aᵀ` are
// recomputed in backward instead of kept. Autograd's own graph for the same formula keeps g,
// silu(g), u and h (the down projection's LoRA A saves its input), two more full-width
// activations per layer. Called from Rust (src/model/fused.rs) on tch's tensors (at::Tensor*).
// With `kernels` set, the elementwise work each way is one fused kernel of ftx-kernels (through
// the table in src/gpu/kernels.cpp) instead of libtorch's chain of elementwise ops (swiglu.h).
#include "swiglu.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstdio>
#include <exception>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

using ftx::swiglu_forward;
using ftx::swiglu_grad;

struct Swiglu : public torch::autograd::Function<Swiglu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gu, bool kernel) {
    RECORD_USER_SCOPE("ftx::swiglu");  // the step ledger's attribution (src/gpu/ledger.cpp)
    ctx->save_for_backward({gu});
    ctx->saved_data["kernel"] = kernel;
    return swiglu_forward(gu, kernel);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto gu = ctx->get_saved_variables()[0];
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    return {swiglu_grad(gu, grads[0], ctx->saved_data["kernel"].toBool()), at::Tensor()};
  }
};

struct SwigluProject : public torch::autograd::Function<SwigluProject> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gu, const at::Tensor& a, bool kernel) {
    RECORD_USER_SCOPE("ftx::swiglu_project");  // the step ledger's attribution (src/gpu/ledger.cpp)
    ctx->save_for_backward({gu, a});
    ctx->saved_data["kernel"] = kernel;
    auto h = swiglu_forward(gu, kernel);
    auto xa = at::matmul(h, a.t());
    return {h, xa};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto gu = saved[0], a = saved[1];
    bool kernel = ctx->saved_data["kernel"].toBool();
    at::Tensor dh = grads[0];
    at::Tensor da;
    if (grads[1].defined()) {
      const auto& dxa = grads[1];
      if (ctx->needs_input_grad(1)) {
        auto h = swiglu_forward(gu, kernel);
        da = at::mm(dxa.reshape({-1, a.size(0)}).t(), h.reshape({-1, a.size(1)}));
      }
      dh = dh.defined() ? dh + at::matmul(dxa, a) : at::matmul(dxa, a);
    }
    if (!dh.defined()) return {at::Tensor(), da, at::Tensor()};
    return {swiglu_grad(gu, dh, kernel), da, at::Tensor()};
  }
};

void write_error(char* err, int32_t len, const char* what) {
  if (err && len > 0) std::snprintf(err, static_cast<size_t>(len), "%s", what);
}

}  // namespace

extern "C" {
// h = silu(g)·u for gu = [g | u] on the last dimension; with `a` (a LoRA A, [r, I]) also
// xa = h·Aᵀ. New tensors are returned through `h` and `xa` (owned by the caller, as tch's).
// `kernels` != 0: the elementwise work through the fused kernels where `gu` fits them.
// 0 on success, else -1 with the message in `err`.
int32_t ftx_swiglu(const at::Tensor* gu, const at::Tensor* a, int32_t kernels, at::Tensor** h, at::Tensor** xa, char* err, int32_t err_len) {
  try {
    bool kernel = kernels != 0 && ftx::swiglu_kernel_fits(*gu);
    if (a == nullptr) {
      *h = new at::Tensor(Swiglu::apply(*gu, kernel));
      *xa = nullptr;
    } else {
      auto out = SwigluProject::apply(*gu, *a, kernel);
      *h = new at::Tensor(out[0]);
      *xa = new at::Tensor(out[1]);
    }
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}
}
