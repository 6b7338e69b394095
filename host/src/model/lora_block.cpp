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
// Recomputing gu as well (one more gate/up GEMM per layer in backward, about a quarter of the
// step's arithmetic) would keep 2i fewer columns; see README "LoRA block nodes".
//
// The frozen weights travel as plain (non-variable) arguments: no gradient flows to them, and
// NF4 weights are dequantised into x's dtype on each use (forward, and again in backward), as
// nf4_linear.cpp does. Any leading shape of x is accepted (rows are independent), so callers
// may run the MLP on row slices (train::step tiles it at long context).
// Called from Rust (src/model/lora_block.rs) on tch's tensors (at::Tensor*).
#include "nf4_dequantize.h"
#include "swiglu.h"

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

extern "C" {
// A frozen base weight as Rust hands it over: dense `w` (not null), or NF4 `packed` bytes with
// fp32 block `absmax`es and the byte `table` for a `rows × cols` weight; `bias` may be null.
// Mirrors `FrozenWeight` in src/model/lora_block.rs.
struct FtxFrozenWeight {
  const at::Tensor* w;
  const at::Tensor* packed;
  const at::Tensor* absmax;
  const at::Tensor* table;
  int64_t rows, cols;
  const at::Tensor* bias;
};
}

namespace {

// A frozen base weight and bias (no gradient), dense or NF4.
struct Frozen {
  at::Tensor w, packed, absmax, table, bias;
  int64_t rows = 0, cols = 0;

  static Frozen of(const FtxFrozenWeight& f) {
    Frozen out;
    if (f.bias) out.bias = *f.bias;
    if (f.w) {
      out.w = *f.w;
      out.rows = out.w.size(0);
      out.cols = out.w.size(1);
    } else {
      TORCH_CHECK(f.packed && f.absmax && f.table, "a frozen weight is dense or NF4");
      ftx::check_nf4_shape(*f.packed, *f.absmax, f.rows, f.cols);
      out.packed = *f.packed;
      out.absmax = *f.absmax;
      out.table = *f.table;
      out.rows = f.rows;
      out.cols = f.cols;
    }
    TORCH_CHECK(!out.w.defined() || !out.w.requires_grad(), "the LoRA block nodes take a frozen base weight");
    TORCH_CHECK(!out.bias.defined() || (!out.bias.requires_grad() && out.bias.numel() == out.rows),
                "the LoRA block nodes take a frozen bias of one entry per output");
    return out;
  }

  // W `[rows, cols]` in `kind` (NF4: dequantised now).
  at::Tensor weight(at::ScalarType kind) const {
    return w.defined() ? w : ftx::nf4_dequantize(packed, absmax, table, rows, cols, kind);
  }

  // Kept in the node's saved data (not as saved variables: they carry no gradient).
  void save(AutogradContext* ctx, const std::string& p) const {
    const std::pair<const char*, const at::Tensor*> parts[] = {{"w", &w}, {"packed", &packed}, {"absmax", &absmax}, {"table", &table}};
    for (const auto& [name, t] : parts) {
      if (t->defined()) ctx->saved_data[p + name] = *t;
    }
    ctx->saved_data[p + "rows"] = rows;
    ctx->saved_data[p + "cols"] = cols;
  }

  static Frozen load(AutogradContext* ctx, const std::string& p) {
    Frozen f;
    auto get = [&](const char* name) {
      auto it = ctx->saved_data.find(p + name);
      return it == ctx->saved_data.end() ? at::Tensor() : it->second.toTensor();
    };
    f.w = get("w");
    f.packed = get("packed");
    f.absmax = get("absmax");
    f.table = get("table");
    f.rows = ctx->saved_data[p + "rows"].toInt();
    f.cols = ctx->saved_data[p + "cols"].toInt();
    return f;
  }
};

// `t` as rows `[n, t.size(-1)]` (a view when `t` is contiguous).
at::Tensor rows_of(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// `x`'s shape with the last dimension `n`.
std::vector<int64_t> with_last(const at::Tensor& x, int64_t n) {
  auto shape = x.sizes().vec();
  shape.back() = n;
  return shape;
}

// x·Wᵀ + bias + s·xa·Bᵀ on rows: the base GEMM (bias as its beta term), then the adapter's
// up-projection accumulated into its output with the scale as alpha.
at::Tensor lora_product(const at::Tensor& x2, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& xa,
                        const at::Tensor& b, double s) {
  auto y = bias.defined() ? at::addmm(bias, x2, w.t()) : at::mm(x2, w.t());
  y.addmm_(xa, b.t(), 1.0, s);
  return y;
}

// The gated activation's h = act(g)·u for gu = [g | u] and its gradient dgu from dh: SwiGLU
// through swiglu.h (the fused kernel when `kernel`), GeGLU (`gelu`) through libtorch's ops.
at::Tensor gated_forward(const at::Tensor& gu, bool gelu, bool kernel) {
  if (!gelu) return ftx::swiglu_forward(gu, kernel);
  return at::gelu(ftx::swiglu_gate(gu), "tanh").mul_(ftx::swiglu_up(gu));
}

at::Tensor gated_grad(const at::Tensor& gu, const at::Tensor& dh, bool gelu, bool kernel) {
  if (!gelu) return ftx::swiglu_grad(gu, dh, kernel);
  auto dgu = at::empty_like(gu, at::MemoryFormat::Contiguous);
  auto g = ftx::swiglu_gate(gu), u = ftx::swiglu_up(gu);
  auto dg = dgu.narrow(-1, 0, g.size(-1));
  auto du = dgu.narrow(-1, g.size(-1), g.size(-1));
  at::gelu_backward_out(dg, dh * u, g, "tanh");
  at::mul_out(du, dh, at::gelu(g, "tanh"));
  return dgu;
}

struct LoraGrads {
  at::Tensor dx, da, db;
};

// The gradients of lora_product's x, A and B (each only where asked) from dy, on rows:
//   dxa = s·dy·B,  dA = dxaᵀ·x,  dB = s·dyᵀ·xa,  dx = dy·W + dxa·A (one buffer).
LoraGrads lora_grads(bool need_x, bool need_a, bool need_b, const at::Tensor& dy, const at::Tensor& x,
                     const at::Tensor& xa, const at::Tensor& a, const at::Tensor& b,
                     const std::function<at::Tensor()>& weight, double s) {
  LoraGrads g;
  if (need_b) g.db = at::mm(dy.t(), xa).mul_(s);
  if (need_x || need_a) {
    auto dxa = at::mm(dy, b * s);
    if (need_a) g.da = at::mm(dxa.t(), x);
    if (need_x) {
      g.dx = at::mm(dy, weight());
      g.dx.addmm_(dxa, a);
    }
  }
  return g;
}

void check_adapter(const at::Tensor& x, const Frozen& base, const at::Tensor& a, const at::Tensor& b,
                   const char* what) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == base.cols && b.size(0) == base.rows &&
                  b.size(1) == a.size(0) && x.size(-1) == base.cols,
              what, ": mismatched shapes (x ", x.sizes(), ", W ", base.rows, "x", base.cols, ", A ", a.sizes(), ", B ",
              b.sizes(), ")");
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type() &&
                  (!base.w.defined() || base.w.scalar_type() == x.scalar_type()),
              what, ": x, W, A and B in one dtype");
}

struct LoraLinear : public torch::autograd::Function<LoraLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                            const Frozen& base, double s) {
    RECORD_USER_SCOPE("ftx::lora_linear");  // the step ledger's attribution (src/gpu/ledger.cpp)
    auto x2 = rows_of(x);
    auto xa = at::mm(x2, a.t());
    auto y = lora_product(x2, base.weight(x.scalar_type()), base.bias, xa, b, s);
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
                        rows_of(x), xa, a, b, [&] { return base.weight(dy.scalar_type()); },
                        ctx->saved_data["s"].toDouble());
    if (g.dx.defined()) g.dx = g.dx.view(x.sizes());
    return {g.dx, g.da, g.db, none, none};
  }
};

struct LoraMlp : public torch::autograd::Function<LoraMlp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a_gu, const at::Tensor& b_gu,
                            const at::Tensor& a_d, const at::Tensor& b_d, const Frozen& gate_up, const Frozen& down,
                            double s_gu, double s_d, bool gelu, bool kernels) {
    RECORD_USER_SCOPE("ftx::lora_mlp");  // the step ledger's attribution (src/gpu/ledger.cpp)
    auto kind = x.scalar_type();
    auto x2 = rows_of(x);
    auto xa = at::mm(x2, a_gu.t());
    auto gu = lora_product(x2, gate_up.weight(kind), gate_up.bias, xa, b_gu, s_gu);
    bool kernel = !gelu && kernels && ftx::swiglu_kernel_fits(gu);
    auto h = gated_forward(gu, gelu, kernel);
    auto ha = at::mm(h, a_d.t());
    auto y = lora_product(h, down.weight(kind), down.bias, ha, b_d, s_d);
    ctx->save_for_backward({x, xa, gu, ha, a_gu, b_gu, a_d, b_d});
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
    variable_list out(11);
    if (!dy.defined()) return out;
    auto v = ctx->get_saved_variables();
    const auto &x = v[0], &xa = v[1], &gu = v[2], &ha = v[3], &a_gu = v[4], &b_gu = v[5], &a_d = v[6], &b_d = v[7];
    auto gate_up = Frozen::load(ctx, "gu."), down = Frozen::load(ctx, "d.");
    bool kernel = ctx->saved_data["kernel"].toBool(), gelu = ctx->saved_data["gelu"].toBool();
    auto kind = dy.scalar_type();
    bool upstream = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    // The down projection: its input h = act(g)·u recomputed (for A's gradient only).
    at::Tensor h;
    if (ctx->needs_input_grad(3)) h = gated_forward(gu, gelu, kernel);
    auto gd = lora_grads(upstream, ctx->needs_input_grad(3), ctx->needs_input_grad(4), rows_of(dy), h, ha, a_d, b_d,
                         [&] { return down.weight(kind); }, ctx->saved_data["s_d"].toDouble());
    h.reset();
    out[3] = gd.da;
    out[4] = gd.db;
    if (!upstream) return out;
    auto dgu = gated_grad(gu, gd.dx, gelu, kernel);
    gd.dx.reset();
    auto gg = lora_grads(ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2), dgu, rows_of(x),
                         xa, a_gu, b_gu, [&] { return gate_up.weight(kind); }, ctx->saved_data["s_gu"].toDouble());
    out[0] = gg.dx.defined() ? gg.dx.view(x.sizes()) : gg.dx;
    out[1] = gg.da;
    out[2] = gg.db;
    return out;
  }
};

void write_error(char* err, int32_t len, const char* what) {
  if (err && len > 0) std::snprintf(err, static_cast<size_t>(len), "%s", what);
}

}  // namespace

extern "C" {
// `*y` = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ (a new tensor the caller owns, as tch's) for the frozen
// `base` ([out, in]), A [r, in], B [out, r]. 0 on success, else -1 with the message in `err`.
int32_t ftx_lora_linear(const at::Tensor* x, const FtxFrozenWeight* base, const at::Tensor* a, const at::Tensor* b,
                        double s, at::Tensor** y, char* err, int32_t err_len) {
  try {
    auto frozen = Frozen::of(*base);
    check_adapter(*x, frozen, *a, *b, "LoRA linear");
    *y = new at::Tensor(LoraLinear::apply(*x, *a, *b, frozen, s));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}

// `*y` = down(act(g)·u) with [g | u] = gate_up(x), each a LoRA projection as in
// ftx_lora_linear (gate_up [2i, in] with A_gu [r', in], B_gu [2i, r']; down [out, i]); act is
// SiLU, or with `gelu` != 0 tanh-approximated GELU. `kernels` != 0: SwiGLU's elementwise work
// through the fused kernels where they fit.
int32_t ftx_lora_mlp(const at::Tensor* x, const FtxFrozenWeight* gate_up, const at::Tensor* a_gu,
                     const at::Tensor* b_gu, double s_gu, const FtxFrozenWeight* down, const at::Tensor* a_d,
                     const at::Tensor* b_d, double s_d, int32_t gelu, int32_t kernels, at::Tensor** y, char* err,
                     int32_t err_len) {
  try {
    auto gu = Frozen::of(*gate_up), d = Frozen::of(*down);
    check_adapter(*x, gu, *a_gu, *b_gu, "LoRA MLP gate/up");
    TORCH_CHECK(gu.rows % 2 == 0 && d.cols * 2 == gu.rows, "LoRA MLP: gate/up gives ", gu.rows,
                " columns, down takes ", d.cols);
    TORCH_CHECK(a_d->dim() == 2 && b_d->dim() == 2 && a_d->size(1) == d.cols && b_d->size(0) == d.rows &&
                    b_d->size(1) == a_d->size(0) && a_d->scalar_type() == x->scalar_type() &&
                    b_d->scalar_type() == x->scalar_type() && (!d.w.defined() || d.w.scalar_type() == x->scalar_type()),
                "LoRA MLP down: mismatched shapes or dtypes (W ", d.rows, "x", d.cols, ", A ", a_d->sizes(), ", B ",
                b_d->sizes(), ")");
    *y = new at::Tensor(LoraMlp::apply(*x, *a_gu, *b_gu, *a_d, *b_d, gu, d, s_gu, s_d, gelu != 0, kernels != 0));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}
}
