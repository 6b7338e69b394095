// The pieces the LoRA block nodes (lora_block.cpp) and the DoRA block nodes (dora_block.cpp)
// share: the frozen base weight as Rust hands it over, a LoRA projection's product and its
// gradients on rows, and the gated activation each way. See lora_block.cpp for the formulas.
#pragma once

#include "fp8.h"
#include "nf4_dequantize.h"
#include "swiglu.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

extern "C" {
// A frozen base weight as Rust hands it over: dense `w` (not null), or NF4 `packed` bytes with
// fp32 block `absmax`es and the byte `table` for a `rows × cols` weight, or FP8 `w8` codes
// (e4m3, `[rows, cols]`, contiguous) with one fp32 `w8_scale` per row; `bias` may be null.
// Mirrors `FrozenWeight` in src/model/lora_block.rs.
struct FtxFrozenWeight {
  const at::Tensor* w;
  const at::Tensor* packed;
  const at::Tensor* absmax;
  const at::Tensor* table;
  int64_t rows, cols;
  const at::Tensor* bias;
  const at::Tensor* w8;
  const at::Tensor* w8_scale;
};
}

namespace ftx::block {

using torch::autograd::AutogradContext;


// x·Wᵀ + bias on rows for a dense W (bias as the GEMM's beta term; may be undefined).
inline at::Tensor dense_product(const at::Tensor& x2, const at::Tensor& w, const at::Tensor& bias) {
  return bias.defined() ? at::addmm(bias, x2, w.t()) : at::mm(x2, w.t());
}

// FP8 switches read once from the environment (for A/B runs of one binary): FTX_FP8_FAST_ACCUM=0
// accumulates the forward FP8 GEMMs at full precision; FTX_FP8_BACKWARD=0 runs the input
// gradient's GEMM in the compute dtype over the dequantised weight.
inline bool fp8_switch(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::string(v) != "0";
}

// A frozen base weight and bias (no gradient), dense, NF4 or FP8.
struct Frozen {
  at::Tensor w, packed, absmax, table, bias, w8, w8_scale;
  int64_t rows = 0, cols = 0;

  static Frozen of(const FtxFrozenWeight& f) {
    Frozen out;
    if (f.bias) out.bias = *f.bias;
    if (f.w) {
      out.w = *f.w;
      out.rows = out.w.size(0);
      out.cols = out.w.size(1);
    } else if (f.w8) {
      TORCH_CHECK(f.w8_scale, "an FP8 weight comes with its row scales");
      out.w8 = *f.w8;
      out.w8_scale = *f.w8_scale;
      TORCH_CHECK(out.w8.dim() == 2 && out.w8.scalar_type() == at::kFloat8_e4m3fn && out.w8.is_contiguous() &&
                      out.w8_scale.scalar_type() == at::kFloat && out.w8_scale.numel() == out.w8.size(0),
                  "an FP8 weight is [rows, cols] e4m3 codes (contiguous) with one fp32 scale per row");
      out.rows = out.w8.size(0);
      out.cols = out.w8.size(1);
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

  // W `[rows, cols]` in `kind` (NF4 and FP8: dequantised now).
  at::Tensor weight(at::ScalarType kind) const {
    if (w.defined()) return w;
    if (w8.defined()) return w8.to(at::kFloat).mul_(w8_scale.view({-1, 1})).to(kind);
    return ftx::nf4_dequantize(packed, absmax, table, rows, cols, kind);
  }

  // x·Wᵀ + bias on rows: with FP8 codes one FP8 GEMM over x quantised per row (fp8.h), else the
  // dense (or dequantised) weight's GEMM.
  at::Tensor product(const at::Tensor& x2) const {
    if (!w8.defined()) return dense_product(x2, weight(x2.scalar_type()), bias);
    static const bool fast_accum = fp8_switch("FTX_FP8_FAST_ACCUM");
    return ftx::fp8::quantized_mm(x2, at::Tensor(), w8, w8_scale, bias, fast_accum);
  }

  // dy·W on rows, the input's gradient through the base: with FP8 codes dy takes W's row
  // scales as its column factor before its own rowwise quantisation (fp8.h), so the GEMM runs
  // over the codes' transpose with unit scales.
  at::Tensor input_grad(const at::Tensor& dy) const {
    static const bool fp8_backward = fp8_switch("FTX_FP8_BACKWARD");
    if (!w8.defined() || !fp8_backward) return at::mm(dy, weight(dy.scalar_type()));
    auto unit = at::ones({cols}, w8_scale.options());
    return ftx::fp8::quantized_mm(dy, w8_scale, w8.t().contiguous(), unit, at::Tensor(), /*fast_accum=*/false);
  }

  // Kept in the node's saved data (not as saved variables: they carry no gradient).
  void save(AutogradContext* ctx, const std::string& p) const {
    const std::pair<const char*, const at::Tensor*> parts[] = {{"w", &w},         {"packed", &packed}, {"absmax", &absmax},
                                                               {"table", &table}, {"w8", &w8},         {"w8s", &w8_scale}};
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
    f.w8 = get("w8");
    f.w8_scale = get("w8s");
    f.rows = ctx->saved_data[p + "rows"].toInt();
    f.cols = ctx->saved_data[p + "cols"].toInt();
    return f;
  }
};

// `t` as rows `[n, t.size(-1)]` (a view when `t` is contiguous).
inline at::Tensor rows_of(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// `x`'s shape with the last dimension `n`.
inline std::vector<int64_t> with_last(const at::Tensor& x, int64_t n) {
  auto shape = x.sizes().vec();
  shape.back() = n;
  return shape;
}

// `base` (x·Wᵀ + bias on rows, a fresh tensor) + s·xa·Bᵀ: the adapter's up-projection
// accumulated into the base GEMM's output with the scale as alpha.
inline at::Tensor lora_product(at::Tensor base, const at::Tensor& xa, const at::Tensor& b, double s) {
  base.addmm_(xa, b.t(), 1.0, s);
  return base;
}

// The gated activation's h = act(g)·u for gu = [g | u] and its gradient dgu from dh: SwiGLU
// through swiglu.h (the fused kernel when `kernel`), GeGLU (`gelu`) through libtorch's ops.
inline at::Tensor gated_forward(const at::Tensor& gu, bool gelu, bool kernel) {
  if (!gelu) return ftx::swiglu_forward(gu, kernel);
  return at::gelu(ftx::swiglu_gate(gu), "tanh").mul_(ftx::swiglu_up(gu));
}

inline at::Tensor gated_grad(const at::Tensor& gu, const at::Tensor& dh, bool gelu, bool kernel) {
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
//   dxa = s·dy·B,  dA = dxaᵀ·x,  dB = s·dyᵀ·xa,  dx = dy·W + dxa·A (one buffer), with dy·W
// from `through_base` (the frozen weight's GEMM: Frozen::input_grad, or DoRA's rescaled W).
inline LoraGrads lora_grads(bool need_x, bool need_a, bool need_b, const at::Tensor& dy, const at::Tensor& x,
                     const at::Tensor& xa, const at::Tensor& a, const at::Tensor& b,
                     const std::function<at::Tensor(const at::Tensor&)>& through_base, double s) {
  LoraGrads g;
  if (need_b) g.db = at::mm(dy.t(), xa).mul_(s);
  if (need_x || need_a) {
    auto dxa = at::mm(dy, b * s);
    if (need_a) g.da = at::mm(dxa.t(), x);
    if (need_x) {
      g.dx = through_base(dy);
      g.dx.addmm_(dxa, a);
    }
  }
  return g;
}

inline void check_adapter(const at::Tensor& x, const Frozen& base, const at::Tensor& a, const at::Tensor& b,
                   const char* what) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == base.cols && b.size(0) == base.rows &&
                  b.size(1) == a.size(0) && x.size(-1) == base.cols,
              what, ": mismatched shapes (x ", x.sizes(), ", W ", base.rows, "x", base.cols, ", A ", a.sizes(), ", B ",
              b.sizes(), ")");
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type() &&
                  (!base.w.defined() || base.w.scalar_type() == x.scalar_type()) &&
                  (!base.w8.defined() || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              what, ": x, W, A and B in one dtype");
}

inline void write_error(char* err, int32_t len, const char* what) {
  if (err && len > 0) std::snprintf(err, static_cast<size_t>(len), "%s", what);
}

// A C entry's body run with its exceptions caught: 0 on success, else -1 with the message in
// `err` (the block nodes' C interface).
template <typename Body>
int32_t guarded(char* err, int32_t len, Body&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    write_error(err, len, e.what());
    return -1;
  }
}

// The gated MLP's adapters (LoRA or DoRA, `what` naming which): gate/up as check_adapter, its
// width twice down's input, and down's A and B against its weight and x's dtype.
inline void check_mlp(const at::Tensor& x, const Frozen& gu, const at::Tensor& a_gu, const at::Tensor& b_gu,
                      const Frozen& d, const at::Tensor& a_d, const at::Tensor& b_d, const std::string& what) {
  check_adapter(x, gu, a_gu, b_gu, (what + " gate/up").c_str());
  TORCH_CHECK(gu.rows % 2 == 0 && d.cols * 2 == gu.rows, what, ": gate/up gives ", gu.rows, " columns, down takes ",
              d.cols);
  TORCH_CHECK(a_d.dim() == 2 && b_d.dim() == 2 && a_d.size(1) == d.cols && b_d.size(0) == d.rows &&
                  b_d.size(1) == a_d.size(0) && a_d.scalar_type() == x.scalar_type() &&
                  b_d.scalar_type() == x.scalar_type() && (!d.w.defined() || d.w.scalar_type() == x.scalar_type()),
              what, " down: mismatched shapes or dtypes (W ", d.rows, "x", d.cols, ", A ", a_d.sizes(), ", B ",
              b_d.sizes(), ")");
}

}  // namespace ftx::block
