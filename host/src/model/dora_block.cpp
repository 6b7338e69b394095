// DoRA projections inside the block nodes, with their backward written out by hand: the DoRA
// counterparts of lora_block.cpp's two nodes, sharing its pieces (lora_block.h).
//
// - DoraProjections: y = scale ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias, scale = m / ‖W + s·B·A‖ per
//   output (the norm detached, given by the caller: src/model/fused.rs `dora_norm`), for the
//   attention's q/k/v (one fused group: A stacked, B block-diagonal, m and the norms
//   concatenated) or any one projection. PEFT's formula: the bias outside the scaling.
// - DoraMlp: the whole gated MLP, gate/up (one fused group) → act(g)·u → down, each projection
//   a DoRA one as above.
//
// The column scale is folded into the GEMMs' weights (scale ⊙ W and scale ⊙ B, weight-sized,
// as dora_linear.cpp does) rather than applied to the output: for llama-3.2-1b at 16k tokens a
// q/k/v weight is 6.3M entries and its output 50M, so scaling the weight costs an eighth of a
// pass over the output, each way. So the forward is LoRA's node — base GEMM, adapter
// accumulated by addmm with alpha = s — and in backward the input gradient and A's and B's
// need no scaled copy of dy either (dX = dY·(scale ⊙ W) + dXA·A, dXA = s·dY·(scale ⊙ B),
// dB = scale ⊙ s·dYᵀ·XA). The one token-sized pass DoRA adds each way is m's gradient,
//   dL/dm_j = Σ_t dy_tj · y0_tj / ‖·‖_j = Σ_t dy_tj · (y_tj − bias_j) / m_j,
// one read of dy and of the node's output y. y is kept for it; recomputing the pre-scale
// output instead would be one more base GEMM per projection (as much arithmetic as the
// forward's), to spare a tensor the MLP keeps anyway for gate/up (gu, what act's backward
// reads). The q/k/v group keeps its output (what the per-projection DoRA node keeps too) and
// the MLP keeps the down projection's output; what the MLP does not keep, unlike autograd's
// composition of the DoRA node with the SwiGLU node, is act(g)·u (the down projection's
// input, recomputed for A's gradient). A magnitude entry of exactly 0 makes its row's output
// the bias and its gradient 0 here, as in dora_linear.cpp.
//
// Called from Rust (src/model/dora_block.rs) on tch's tensors (at::Tensor*).
#include "lora_block.h"

#include <ATen/record_function.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <exception>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

using namespace ftx::block;

// The per-output column scale m / ‖·‖ as a `[out, 1]` column, in m's dtype.
at::Tensor column_scale(const at::Tensor& m, const at::Tensor& norm) { return (m / norm).unsqueeze(1); }

// m's gradient Σ_t dy·(y − bias) / m (0 where the applied scale is 0), from the node's output
// `y` and its gradient `dy` (rows), summed in fp32.
at::Tensor magnitude_grad(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& bias, const at::Tensor& m,
                          const at::Tensor& norm) {
  auto gy = bias.defined() ? at::sum(dy * (y - bias), {0}, false, at::kFloat) : at::sum(dy * y, {0}, false, at::kFloat);
  auto applied = (m / norm).to(at::kFloat) * norm.to(at::kFloat);
  return at::where(applied == 0, at::zeros_like(gy), gy / applied).to(m.scalar_type());
}

// One DoRA projection (group) on rows: the LoRA product with the scale in W and B.
at::Tensor dora_product(const at::Tensor& x2, const Frozen& base, const at::Tensor& xa, const at::Tensor& b,
                        const at::Tensor& scale, double s) {
  return lora_product(dense_product(x2, base.weight(x2.scalar_type()) * scale, base.bias), xa, b * scale, s);
}

struct DoraGrads {
  at::Tensor dx, da, db, dm;
};

// The gradients of dora_product's x, A, B and m (each only where asked) from dy, on rows;
// `y` is its output.
DoraGrads dora_grads(bool need_x, bool need_a, bool need_b, bool need_m, const at::Tensor& dy, const at::Tensor& x,
                     const at::Tensor& xa, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& m, const at::Tensor& norm, const Frozen& base, double s) {
  auto scale = column_scale(m, norm);
  auto g = lora_grads(need_x, need_a, need_b, dy, x, xa, a, b * scale, [&](const at::Tensor& d) { return at::mm(d, base.weight(d.scalar_type()) * scale); }, s);
  DoraGrads out{g.dx, g.da, g.db, {}};
  if (out.db.defined()) out.db.mul_(scale);
  if (need_m) out.dm = magnitude_grad(dy, y, base.bias, m, norm);
  return out;
}

struct DoraProjections : public torch::autograd::Function<DoraProjections> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& m, const at::Tensor& norm, const Frozen& base, double s) {
    RECORD_USER_SCOPE("ftx::dora_projections");  // the step ledger's attribution (src/gpu/ledger.cpp)
    auto x2 = rows_of(x);
    auto xa = at::mm(x2, a.t());
    auto y = dora_product(x2, base, xa, b, column_scale(m, norm), s);
    ctx->save_for_backward({x, xa, y, a, b, m, norm});
    base.save(ctx, "");
    if (base.bias.defined()) ctx->saved_data["bias"] = base.bias;
    ctx->saved_data["s"] = s;
    return y.view(with_last(x, base.rows));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor none;
    variable_list out(7);
    const auto& dy = grads[0];
    if (!dy.defined()) return out;
    auto v = ctx->get_saved_variables();
    const auto &x = v[0], &xa = v[1], &y = v[2], &a = v[3], &b = v[4], &m = v[5], &norm = v[6];
    auto base = Frozen::load(ctx, "");
    auto bias = ctx->saved_data.find("bias");
    if (bias != ctx->saved_data.end()) base.bias = bias->second.toTensor();
    auto g = dora_grads(ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                        ctx->needs_input_grad(3), rows_of(dy), rows_of(x), xa, y, a, b, m, norm, base,
                        ctx->saved_data["s"].toDouble());
    out[0] = g.dx.defined() ? g.dx.view(x.sizes()) : g.dx;
    out[1] = g.da;
    out[2] = g.db;
    out[3] = g.dm;
    return out;
  }
};

struct DoraMlp : public torch::autograd::Function<DoraMlp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a_gu, const at::Tensor& b_gu,
                            const at::Tensor& m_gu, const at::Tensor& norm_gu, const at::Tensor& a_d,
                            const at::Tensor& b_d, const at::Tensor& m_d, const at::Tensor& norm_d,
                            const Frozen& gate_up, const Frozen& down, double s_gu, double s_d, bool gelu,
                            bool kernels) {
    RECORD_USER_SCOPE("ftx::dora_mlp");  // the step ledger's attribution (src/gpu/ledger.cpp)
    auto x2 = rows_of(x);
    auto xa = at::mm(x2, a_gu.t());
    auto gu = dora_product(x2, gate_up, xa, b_gu, column_scale(m_gu, norm_gu), s_gu);
    bool kernel = !gelu && kernels && ftx::swiglu_kernel_fits(gu);
    auto h = gated_forward(gu, gelu, kernel);
    auto ha = at::mm(h, a_d.t());
    auto y = dora_product(h, down, ha, b_d, column_scale(m_d, norm_d), s_d);
    ctx->save_for_backward({x, xa, gu, ha, y, a_gu, b_gu, m_gu, norm_gu, a_d, b_d, m_d, norm_d});
    gate_up.save(ctx, "gu.");
    down.save(ctx, "d.");
    if (gate_up.bias.defined()) ctx->saved_data["gu.bias"] = gate_up.bias;
    if (down.bias.defined()) ctx->saved_data["d.bias"] = down.bias;
    ctx->saved_data["s_gu"] = s_gu;
    ctx->saved_data["s_d"] = s_d;
    ctx->saved_data["kernel"] = kernel;
    ctx->saved_data["gelu"] = gelu;
    return y.view(with_last(x, down.rows));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& dy = grads[0];
    variable_list out(15);
    if (!dy.defined()) return out;
    auto v = ctx->get_saved_variables();
    const auto &x = v[0], &xa = v[1], &gu = v[2], &ha = v[3], &y = v[4];
    const auto &a_gu = v[5], &b_gu = v[6], &m_gu = v[7], &norm_gu = v[8];
    const auto &a_d = v[9], &b_d = v[10], &m_d = v[11], &norm_d = v[12];
    auto load = [&](const std::string& p) {
      auto f = Frozen::load(ctx, p);
      auto bias = ctx->saved_data.find(p + "bias");
      if (bias != ctx->saved_data.end()) f.bias = bias->second.toTensor();
      return f;
    };
    auto gate_up = load("gu."), down = load("d.");
    bool kernel = ctx->saved_data["kernel"].toBool(), gelu = ctx->saved_data["gelu"].toBool();
    bool upstream = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2) ||
                    ctx->needs_input_grad(3);
    // The down projection: its input h = act(g)·u recomputed (for A's gradient only).
    at::Tensor h;
    if (ctx->needs_input_grad(5)) h = gated_forward(gu, gelu, kernel);
    auto gd = dora_grads(upstream, ctx->needs_input_grad(5), ctx->needs_input_grad(6), ctx->needs_input_grad(7),
                         rows_of(dy), h, ha, y, a_d, b_d, m_d, norm_d, down, ctx->saved_data["s_d"].toDouble());
    h.reset();
    out[5] = gd.da;
    out[6] = gd.db;
    out[7] = gd.dm;
    if (!upstream) return out;
    auto dgu = gated_grad(gu, gd.dx, gelu, kernel);
    gd.dx.reset();
    auto gg = dora_grads(ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                         ctx->needs_input_grad(3), dgu, rows_of(x), xa, gu, a_gu, b_gu, m_gu, norm_gu, gate_up,
                         ctx->saved_data["s_gu"].toDouble());
    out[0] = gg.dx.defined() ? gg.dx.view(x.sizes()) : gg.dx;
    out[1] = gg.da;
    out[2] = gg.db;
    out[3] = gg.dm;
    return out;
  }
};

// m and its norms: one entry per output of `base`, in x's dtype.
void check_magnitude(const at::Tensor& x, const Frozen& base, const at::Tensor& m, const at::Tensor& norm,
                     const char* what) {
  TORCH_CHECK(m.dim() == 1 && norm.dim() == 1 && m.size(0) == base.rows && norm.size(0) == base.rows, what,
              ": a magnitude and a norm per output (", base.rows, "), got ", m.sizes(), " and ", norm.sizes());
  TORCH_CHECK(m.scalar_type() == x.scalar_type() && norm.scalar_type() == x.scalar_type(), what,
              ": x, the magnitude and the norm in one dtype");
  TORCH_CHECK(!norm.requires_grad(), what, ": the norm is detached");
}

}  // namespace

extern "C" {
// `*y` = (m / norm) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias (a new tensor the caller owns, as tch's) for
// the frozen `base` ([out, in]), A [r, in], B [out, r], m and the detached norm [out]. 0 on
// success, else -1 with the message in `err`.
int32_t ftx_dora_projections(const at::Tensor* x, const FtxFrozenWeight* base, const at::Tensor* a,
                             const at::Tensor* b, const at::Tensor* m, const at::Tensor* norm, double s,
                             at::Tensor** y, char* err, int32_t err_len) {
  return guarded(err, err_len, [&] {
    auto frozen = Frozen::of(*base);
    check_adapter(*x, frozen, *a, *b, "DoRA projections");
    check_magnitude(*x, frozen, *m, *norm, "DoRA projections");
    *y = new at::Tensor(DoraProjections::apply(*x, *a, *b, *m, *norm, frozen, s));
  });
}

// `*y` = down(act(g)·u) with [g | u] = gate_up(x), each a DoRA projection as in
// ftx_dora_projections (gate_up [2i, in] with A_gu [r', in], B_gu [2i, r'], m_gu and norm_gu
// [2i]; down [out, i]); act is SiLU, or with `gelu` != 0 tanh-approximated GELU. `kernels` !=
// 0: SwiGLU's elementwise work through the fused kernels where they fit.
int32_t ftx_dora_mlp(const at::Tensor* x, const FtxFrozenWeight* gate_up, const at::Tensor* a_gu,
                     const at::Tensor* b_gu, const at::Tensor* m_gu, const at::Tensor* norm_gu, double s_gu,
                     const FtxFrozenWeight* down, const at::Tensor* a_d, const at::Tensor* b_d,
                     const at::Tensor* m_d, const at::Tensor* norm_d, double s_d, int32_t gelu, int32_t kernels,
                     at::Tensor** y, char* err, int32_t err_len) {
  return guarded(err, err_len, [&] {
    auto gu = Frozen::of(*gate_up), d = Frozen::of(*down);
    check_mlp(*x, gu, *a_gu, *b_gu, d, *a_d, *b_d, "DoRA MLP");
    check_magnitude(*x, gu, *m_gu, *norm_gu, "DoRA MLP gate/up");
    check_magnitude(*x, d, *m_d, *norm_d, "DoRA MLP down");
    *y = new at::Tensor(DoraMlp::apply(*x, *a_gu, *b_gu, *m_gu, *norm_gu, *a_d, *b_d, *m_d, *norm_d, gu, d, s_gu, s_d,
                                       gelu != 0, kernels != 0));
  });
}
}
