// DoRA's linear layer as one autograd node:
//   y = scale ⊙ (x·Wᵀ + s·xa·Bᵀ),  scale = m / ‖W + s·B·A‖ (per output row, the norm detached)
// for a frozen W (dense, or NF4 bytes), xa = x'·Aᵀ computed outside (its own autograd), B and
// the magnitude m trainable. Called from Rust (src/model/nodes.rs).
//
// Written as autograd would run it — y0 = x·Wᵀ + s·xa·Bᵀ, then y = scale ⊙ y0 — the product
// keeps y0 (one full-width activation per projection) for m's gradient and costs a full-width
// pass each way. Here the scale is folded into the GEMMs' weights instead (scale ⊙ W and
// s·scale ⊙ B: weight-sized, not token-sized), so the forward is LoRA's two GEMMs and nothing
// else, and m's gradient comes from the node's own output:
//   dL/dm_j = Σ_t g_tj · y0_tj / ‖·‖_j = Σ_t g_tj · y_tj / m_j   (as y = (m/‖·‖) ⊙ y0).
// The output is usually kept anyway by what consumes it (the SwiGLU node keeps the fused
// gate/up output), so then nothing extra is kept. A magnitude entry of exactly 0 (PEFT
// initialises m to the base's row norms; only an optimiser step landing on 0.0 makes one)
// makes its row's output 0, and its gradient here 0 (y0 cannot be recovered from y = 0;
// PEFT's would be Σ_t g·y0 / ‖·‖).
//
// The backward recomputes scale ⊙ W (NF4: dequantises again first) for x's gradient and
// keeps no dequantised weight, nor x (only A's gradient needs x, and xa's own GEMM keeps it;
// the down projection's input, from the SwiGLU node, is kept by nobody). Returns the gradients PEFT's graph gives (norm detached).
#include "nf4_dequantize.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// The per-row scale m / ‖W + s·BA‖ (norm given, detached) in the weight's dtype.
at::Tensor row_scale(const at::Tensor& m, const at::Tensor& norm) { return m / norm; }

// scale ⊙ (x·Wᵀ + s·xa·Bᵀ) as one GEMM into a fresh output and one accumulating GEMM on it.
at::Tensor dora_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& xa, const at::Tensor& b,
                        const at::Tensor& scale, double s) {
  const int64_t out = w.size(0);
  auto shape = x.sizes().vec();
  shape.back() = out;
  auto y = at::empty(shape, x.options(), at::MemoryFormat::Contiguous);
  auto y2 = y.view({-1, out});
  at::mm_out(y2, x.reshape({-1, x.size(-1)}), (w * scale.unsqueeze(1)).t());
  y2.addmm_(xa.reshape({-1, xa.size(-1)}), (b * (scale * s).unsqueeze(1)).t());
  return y;
}

// The gradients of x, xa, B and m (undefined where not needed); `weight` gives W (NF4:
// dequantised on the call).
std::array<at::Tensor, 4> dora_backward(AutogradContext* ctx, const at::Tensor& g,
                                        const std::function<at::Tensor()>& weight, const at::Tensor& xa,
                                        const at::Tensor& b, const at::Tensor& m, const at::Tensor& norm,
                                        const at::Tensor& y, double s) {
  std::array<at::Tensor, 4> grads;
  if (!g.defined()) return grads;
  const int64_t out = b.size(0), rank = b.size(1);
  auto g2 = g.reshape({-1, out});
  auto scale = row_scale(m, norm);
  auto lora_scale = (scale * s).unsqueeze(1);
  if (ctx->needs_input_grad(0)) {
    grads[0] = at::mm(g2, weight() * scale.unsqueeze(1)).view(ctx->saved_data["x_sizes"].toIntVector());
  }
  if (ctx->needs_input_grad(2)) grads[1] = at::mm(g2, b * lora_scale).view(xa.sizes());
  if (ctx->needs_input_grad(3)) grads[2] = at::mm(g2.t(), xa.reshape({-1, rank})).mul_(lora_scale);
  if (ctx->needs_input_grad(4)) {
    // Σ_t g·y0 = Σ_t g·y / scale, the scale as the forward applied it; PEFT's m gradient is that
    // over the norm. A zero scale (m_j = 0) left y_j = 0: that row's gradient is 0.
    auto gy = at::sum(g2 * y.reshape({-1, out}), {0}, false, at::kFloat);
    auto applied = scale.to(at::kFloat) * norm.to(at::kFloat);
    grads[3] = at::where(applied == 0, at::zeros_like(gy), gy / applied).to(m.scalar_type());
  }
  return grads;
}

struct DoraDense : public torch::autograd::Function<DoraDense> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& xa,
                            const at::Tensor& b, const at::Tensor& m, const at::Tensor& norm, double s) {
    auto y = dora_forward(x, w, xa, b, row_scale(m, norm), s);
    ctx->save_for_backward({w, xa, b, m, norm, y});
    ctx->saved_data["s"] = s;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto v = ctx->get_saved_variables();
    const auto& w = v[0];
    auto d = dora_backward(ctx, grads[0], [&] { return w; }, v[1], v[2], v[3], v[4], v[5],
                           ctx->saved_data["s"].toDouble());
    return {d[0], at::Tensor(), d[1], d[2], d[3], at::Tensor(), at::Tensor()};
  }
};

// W dequantised by the caller for the forward; only its NF4 bytes are kept.
struct DoraNf4 : public torch::autograd::Function<DoraNf4> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& xa,
                            const at::Tensor& b, const at::Tensor& m, const at::Tensor& norm, double s,
                            const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& table, int64_t rows,
                            int64_t cols) {
    auto y = dora_forward(x, w, xa, b, row_scale(m, norm), s);
    ctx->save_for_backward({xa, b, m, norm, y, packed, absmax, table});
    ctx->saved_data["s"] = s;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["kind"] = x.scalar_type();
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["cols"] = cols;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto v = ctx->get_saved_variables();
    auto weight = [&] {
      return ftx::nf4_dequantize(v[5], v[6], v[7], ctx->saved_data["rows"].toInt(), ctx->saved_data["cols"].toInt(),
                                 ctx->saved_data["kind"].toScalarType());
    };
    auto d = dora_backward(ctx, grads[0], weight, v[0], v[1], v[2], v[3], v[4], ctx->saved_data["s"].toDouble());
    at::Tensor none;
    return {d[0], none, d[1], d[2], d[3], none, none, none, none, none, none, none};
  }
};

}  // namespace

extern "C" {
// `*y` = (m / norm) ⊙ (x·Wᵀ + s·xa·Bᵀ) (a new tensor the caller owns, as tch's) for a frozen
// dense W `[out, in]`; with `packed` (not null) W is that NF4 weight of `rows × cols` (fp32
// block absmaxes, byte table), `w` its dequantisation for the forward. 0 on success, else -1
// with the message in `err`.
int32_t ftx_dora_linear(const at::Tensor* x, const at::Tensor* w, const at::Tensor* xa, const at::Tensor* b,
                        const at::Tensor* m, const at::Tensor* norm, double s, const at::Tensor* packed,
                        const at::Tensor* absmax, const at::Tensor* table, int64_t rows, int64_t cols, at::Tensor** y,
                        char* err, int32_t err_len) {
  try {
    TORCH_CHECK(w->dim() == 2 && b->dim() == 2 && b->size(0) == w->size(0) && m->numel() == w->size(0) &&
                    norm->numel() == w->size(0) && xa->size(-1) == b->size(1) && x->size(-1) == w->size(1),
                "DoRA linear: mismatched shapes (x ", x->sizes(), ", W ", w->sizes(), ", xa ", xa->sizes(), ", B ",
                b->sizes(), ", m ", m->sizes(), ")");
    if (packed == nullptr) {
      *y = new at::Tensor(DoraDense::apply(*x, *w, *xa, *b, *m, *norm, s));
    } else {
      ftx::check_nf4_shape(*packed, *absmax, rows, cols);
      *y = new at::Tensor(DoraNf4::apply(*x, *w, *xa, *b, *m, *norm, s, *packed, *absmax, *table, rows, cols));
    }
    return 0;
  } catch (const std::exception& e) {
    if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return -1;
  }
}
}
