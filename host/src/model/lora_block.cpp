// LoRA projections with their backward written out by hand, as two autograd nodes:
//
// - LoraLinear: y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ for a frozen W (dense, or NF4 bytes), the
//   attention's q/k/v (one fused group: A stacked, B block-diagonal) or any one projection.
// - LoraMlp: the whole gated MLP, gate/up (one fused group) → act(g)·u → down, each with its
//   LoRA adapter: y = down(act(g)·u) with gu = [g | u] = gate_up(x); act is SiLU (SwiGLU) or
//   tanh-approximated GELU (Gemma's GeGLU).
//
// What autograd's composition of the same formulas runs besides the GEMMs (the profile of
// issue 15): a scale pass over x·Aᵀ, and in backward the input gradient of each projection as
// two GEMMs summed by a full-width add (base and adapter), the scale's backward, and the
// SwiGLU/down boundary's add. Here the scale is addmm's alpha (forward and backward), each input
// gradient is one GEMM accumulated into by a second (addmm with beta = 1: dX = dY·W + dXA·A in
// one buffer), and A's and B's gradients are small GEMMs: nothing token-sized is written that
// is not a GEMM output or the activation's one elementwise pass each way.
//
// Saved for backward: the input x, the small x·Aᵀ products (r columns each) and, in the MLP,
// the gate/up output gu (2i columns) — what autograd's composition with the SwiGLU node keeps
// too; act(g)·u is recomputed in backward from gu (one elementwise pass) instead of kept.
// With `recompute` (train.recompute = "mlp") the MLP keeps only x and the x·Aᵀ products and
// runs gu = gate_up(x) again in backward (the same ops on the same operands as the forward, so
// the same values): 2i fewer columns a token for one more gate/up GEMM (README "Selective MLP
// recompute").
//
// The frozen weights travel as plain (non-variable) arguments: no gradient flows to them. NF4
// weights are dequantised into x's dtype on each use (forward, and again in backward), as
// nf4_linear.cpp does; FP8 weights (`method.fp8`) stay codes, and each base GEMM runs in FP8 over
// its other operand quantised per row (fp8.h: Frozen::product and Frozen::input_grad) while the
// adapters' GEMMs and every saved tensor stay in x's dtype. Any leading shape of x is accepted (rows are independent), so callers
// may run the MLP on row slices (train::step tiles it at long context).
// Called from Rust (src/model/lora_block.rs) on tch's tensors (at::Tensor*).
#include "lora_block.h"

#include <ATen/record_function.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

using namespace ftx::block;

struct LoraLinear : public torch::autograd::Function<LoraLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                            const Frozen& base, double s) {
    RECORD_USER_SCOPE("ftx::lora_linear");  // the step ledger's attribution (src/gpu/ledger.cpp)
    auto x2 = rows_of(x);
    auto xa = at::mm(x2, a.t());
    auto y = lora_product(base.product(x2), xa, b, s);
    ctx->save_for_backward({x, xa, a, b});
    base.save(ctx, "");
    ctx->saved_data["s"] = s;
    return y.view(with_last(x, base.rows));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor none;
    const auto& dy = grads[0];
    if (!dy.defined()) return {none, none, none, none, none};
    auto v = ctx->get_saved_variables();
    const auto &x = v[0], &xa = v[1], &a = v[2], &b = v[3];
    auto base = Frozen::load(ctx, "");
    auto g = lora_grads(ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2), rows_of(dy),
                        rows_of(x), xa, a, b, [&](const at::Tensor& d) { return base.input_grad(d); },
                        ctx->saved_data["s"].toDouble());
    if (g.dx.defined()) g.dx = g.dx.view(x.sizes());
    return {g.dx, g.da, g.db, none, none};
  }
};

struct LoraMlp : public torch::autograd::Function<LoraMlp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a_gu, const at::Tensor& b_gu,
                            const at::Tensor& a_d, const at::Tensor& b_d, const Frozen& gate_up, const Frozen& down,
                            double s_gu, double s_d, bool gelu, bool kernels, bool recompute) {
    RECORD_USER_SCOPE("ftx::lora_mlp");  // the step ledger's attribution (src/gpu/ledger.cpp)
    auto x2 = rows_of(x);
    auto xa = at::mm(x2, a_gu.t());
    auto gu = lora_product(gate_up.product(x2), xa, b_gu, s_gu);
    bool kernel = !gelu && kernels && ftx::swiglu_kernel_fits(gu);
    auto h = gated_forward(gu, gelu, kernel);
    auto ha = at::mm(h, a_d.t());
    auto y = lora_product(down.product(h), ha, b_d, s_d);
    // With `recompute` gu is not kept (an undefined slot): backward runs it again from x.
    ctx->save_for_backward({x, xa, recompute ? at::Tensor() : gu, ha, a_gu, b_gu, a_d, b_d});
    gate_up.save(ctx, "gu.");
    down.save(ctx, "d.");
    ctx->saved_data["s_gu"] = s_gu;
    ctx->saved_data["s_d"] = s_d;
    ctx->saved_data["kernel"] = kernel;
    ctx->saved_data["gelu"] = gelu;
    return y.view(with_last(x, down.rows));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor none;
    const auto& dy = grads[0];
    variable_list out(12);
    if (!dy.defined()) return out;
    auto v = ctx->get_saved_variables();
    const auto &x = v[0], &xa = v[1], &ha = v[3], &a_gu = v[4], &b_gu = v[5], &a_d = v[6], &b_d = v[7];
    auto gate_up = Frozen::load(ctx, "gu."), down = Frozen::load(ctx, "d.");
    bool kernel = ctx->saved_data["kernel"].toBool(), gelu = ctx->saved_data["gelu"].toBool();
    // Selective recompute: gu as the forward computed it (same GEMMs, same operands).
    auto gu = v[2].defined() ? v[2] : lora_product(gate_up.product(rows_of(x)), xa, b_gu, ctx->saved_data["s_gu"].toDouble());
    bool upstream = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    // The down projection: its input h = act(g)·u recomputed (for A's gradient only).
    at::Tensor h;
    if (ctx->needs_input_grad(3)) h = gated_forward(gu, gelu, kernel);
    auto gd = lora_grads(upstream, ctx->needs_input_grad(3), ctx->needs_input_grad(4), rows_of(dy), h, ha, a_d, b_d,
                         [&](const at::Tensor& d) { return down.input_grad(d); }, ctx->saved_data["s_d"].toDouble());
    h.reset();
    out[3] = gd.da;
    out[4] = gd.db;
    if (!upstream) return out;
    auto dgu = gated_grad(gu, gd.dx, gelu, kernel);
    gd.dx.reset();
    gu.reset();  // a recomputed gu goes before the gate/up gradients' GEMMs
    auto gg = lora_grads(ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2), dgu, rows_of(x),
                         xa, a_gu, b_gu, [&](const at::Tensor& d) { return gate_up.input_grad(d); }, ctx->saved_data["s_gu"].toDouble());
    out[0] = gg.dx.defined() ? gg.dx.view(x.sizes()) : gg.dx;
    out[1] = gg.da;
    out[2] = gg.db;
    return out;
  }
};

}  // namespace

extern "C" {
// `*y` = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ (a new tensor the caller owns, as tch's) for the frozen
// `base` ([out, in]), A [r, in], B [out, r]. 0 on success, else -1 with the message in `err`.
int32_t ftx_lora_linear(const at::Tensor* x, const FtxFrozenWeight* base, const at::Tensor* a, const at::Tensor* b,
                        double s, at::Tensor** y, char* err, int32_t err_len) {
  return guarded(err, err_len, [&] {
    auto frozen = Frozen::of(*base);
    check_adapter(*x, frozen, *a, *b, "LoRA linear");
    *y = new at::Tensor(LoraLinear::apply(*x, *a, *b, frozen, s));
  });
}

// `*y` = down(act(g)·u) with [g | u] = gate_up(x), each a LoRA projection as in
// ftx_lora_linear (gate_up [2i, in] with A_gu [r', in], B_gu [2i, r']; down [out, i]); act is
// SiLU, or with `gelu` != 0 tanh-approximated GELU. `kernels` != 0: SwiGLU's elementwise work
// through the fused kernels where they fit. `recompute` != 0: gu not kept, recomputed in backward.
int32_t ftx_lora_mlp(const at::Tensor* x, const FtxFrozenWeight* gate_up, const at::Tensor* a_gu,
                     const at::Tensor* b_gu, double s_gu, const FtxFrozenWeight* down, const at::Tensor* a_d,
                     const at::Tensor* b_d, double s_d, int32_t gelu, int32_t kernels, int32_t recompute,
                     at::Tensor** y, char* err, int32_t err_len) {
  return guarded(err, err_len, [&] {
    auto gu = Frozen::of(*gate_up), d = Frozen::of(*down);
    check_mlp(*x, gu, *a_gu, *b_gu, d, *a_d, *b_d, "LoRA MLP");
    *y = new at::Tensor(LoraMlp::apply(*x, *a_gu, *b_gu, *a_d, *b_d, gu, d, s_gu, s_d, gelu != 0, kernels != 0,
                                         recompute != 0));
  });
}
}
