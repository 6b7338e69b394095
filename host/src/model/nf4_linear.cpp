// `y = x·Wᵀ` for a frozen NF4 weight (or several stacked on the output dimension) as one
// autograd node that keeps only the NF4 bytes and block scales: W is dequantised into x's
// dtype for the forward GEMM and again for the backward one, as bitsandbytes' 4-bit matmul
// does. A plain `x.linear(dequantised W)` has autograd keep the dequantised weight — the size
// of the whole bf16 layer — from forward to backward. Called from Rust (src/model/nodes.rs),
// also grouped over a mixture-of-experts layer's experts (`Nf4GroupedLinear`).
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

// A 16-byte aligned start for `_grouped_mm`'s CUDA kernel (a view may start anywhere).
at::Tensor aligned_start(const at::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// The grouped form (a mixture-of-experts layer's experts): W's rows are `groups` equal blocks
// W_g (every expert's projection, stacked), and the rows of x are sorted by group, `offs`
// (int32) their cumulative ends: y[rows of g] = x[rows of g]·W_gᵀ, one `_grouped_mm` each way.
// Rust checks that both widths are whole 16 bytes, as `_grouped_mm` needs of the operands and
// the gradients it is handed.
struct Nf4GroupedLinear : public torch::autograd::Function<Nf4GroupedLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const at::Tensor& table, const at::Tensor& offs, int64_t rows,
                            int64_t cols, int64_t groups) {
    ctx->save_for_backward({packed, absmax, table, offs});
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["cols"] = cols;
    ctx->saved_data["groups"] = groups;
    auto w = nf4_dequantize(packed, absmax, table, rows, cols, x.scalar_type()).view({groups, rows / groups, cols});
    return at::_grouped_mm(aligned_start(x), w.transpose(1, 2), offs);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& dy = grads[0];
    at::Tensor dx;
    if (dy.defined() && ctx->needs_input_grad(0)) {
      auto s = ctx->get_saved_variables();
      auto rows = ctx->saved_data["rows"].toInt();
      auto groups = ctx->saved_data["groups"].toInt();
      auto w = nf4_dequantize(s[0], s[1], s[2], rows, ctx->saved_data["cols"].toInt(), dy.scalar_type())
                   .view({groups, rows / groups, -1});
      dx = at::_grouped_mm(aligned_start(dy), w, s[3]);
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {
// `*y` = the grouped product of `Nf4GroupedLinear` (a new tensor the caller owns) for W of
// `rows × cols` in `groups` blocks given as NF4 bytes, fp32 block absmaxes and the byte table.
// 0 on success, else -1 with the message in `err`.
int32_t ftx_nf4_grouped_linear(const at::Tensor* x, const at::Tensor* packed, const at::Tensor* absmax,
                               const at::Tensor* table, const at::Tensor* offs, int64_t rows, int64_t cols,
                               int64_t groups, at::Tensor** y, char* err, int32_t err_len) {
  try {
    ftx::check_nf4_shape(*packed, *absmax, rows, cols);
    TORCH_CHECK(groups > 0 && rows % groups == 0, "NF4 weight of ", rows, " rows is not ", groups, " equal groups");
    *y = new at::Tensor(Nf4GroupedLinear::apply(*x, *packed, *absmax, *table, *offs, rows, cols, groups));
    return 0;
  } catch (const std::exception& e) {
    if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return -1;
  }
}

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
