// `y = x·Wᵀ` for a frozen NF4 weight (or several stacked on the output dimension) as one
// autograd node that keeps only the NF4 bytes and block scales: W is dequantised into x's
// dtype for the forward GEMM and again for the backward one, as bitsandbytes' 4-bit matmul
// does. A plain `x.linear(dequantised W)` has autograd keep the dequantised weight — the size
// of the whole bf16 layer — from forward to backward. Called from Rust (src/model/fused.rs).
#include "nf4_dequantize.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstdio>
#include <exception>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

using ftx::nf4_dequantize;

struct Nf4Linear : public torch::autograd::Function<Nf4Linear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const at::Tensor& table, int64_t rows, int64_t cols) {
    ctx->save_for_backward({packed, absmax, table});
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["cols"] = cols;
    return at::linear(x, nf4_dequantize(packed, absmax, table, rows, cols, x.scalar_type()));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& dy = grads[0];
    at::Tensor dx;
    if (dy.defined() && ctx->needs_input_grad(0)) {
      auto s = ctx->get_saved_variables();
      auto w = nf4_dequantize(s[0], s[1], s[2], ctx->saved_data["rows"].toInt(), ctx->saved_data["cols"].toInt(),
                          dy.scalar_type());
      dx = at::matmul(dy, w);
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {
// `*y` = x·Wᵀ (a new tensor the caller owns, as tch's) for W of `rows × cols` given as NF4
// bytes, fp32 block absmaxes and the byte table. 0 on success, else -1 with the message in `err`.
int32_t ftx_nf4_linear(const at::Tensor* x, const at::Tensor* packed, const at::Tensor* absmax,
                       const at::Tensor* table, int64_t rows, int64_t cols, at::Tensor** y, char* err,
                       int32_t err_len) {
  try {
    ftx::check_nf4_shape(*packed, *absmax, rows, cols);
    *y = new at::Tensor(Nf4Linear::apply(*x, *packed, *absmax, *table, rows, cols));
    return 0;
  } catch (const std::exception& e) {
    if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return -1;
  }
}
}
