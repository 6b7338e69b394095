// FP8 (e4m3) for the frozen base's GEMMs (`method.fp8`, issue 15's stretch lever): the frozen
// weight is stored as e4m3 codes with one fp32 scale per output row, the GEMM's other operand
// (the input forward, the output gradient backward) is quantised per row on the fly, and the
// product runs on Hopper's FP8 tensor cores (`at::_scaled_mm`, rowwise scales, bf16 out). On a
// machine without them (the CPU) the same codes and scales are multiplied in fp32 — the
// reference the CUDA product is checked against (`ftx bench kernels`).
//
// Rowwise quantisation of x [rows, n] with an optional per-column factor c [n] (fp32):
//   v = x·c (fp32), amax = max|v| over the row, q = e4m3(clamp(v·(448/amax), ±448)) rounded to
//   nearest even, scale = amax/448 — so v ≈ q·scale; an all-zero row gets scale 1 and zeros.
// The column factor carries the weight's per-output-row scale into the output gradient in
// backward: dX = dY·W = (dY·diag(s_w))·Q_w, so Q_w's transpose needs no scale of its own.
#pragma once

#include "../gpu/kernels.h"

#include <ATen/ATen.h>

#include <utility>

namespace ftx::fp8 {

// e4m3's largest finite value.
constexpr double kMax = 448.0;

// The quantisation above through libtorch's ops (the reference the CUDA kernel matches bit for
// bit): {q [rows, n] e4m3, scale [rows, 1] fp32}. Both divisions are by a tensor: libtorch's CUDA
// division by a Scalar multiplies by its float reciprocal instead, one bit off at times (and
// unlike the CPU's).
inline std::pair<at::Tensor, at::Tensor> quantize_rows_reference(const at::Tensor& x, const at::Tensor& col_scale) {
  auto v = x.to(at::kFloat);
  if (col_scale.defined()) v = v * col_scale.to(at::kFloat).view({1, -1});
  auto amax = v.abs().amax({-1}, true);
  auto nonzero = amax.gt(0);
  auto limit = at::full({}, kMax, amax.options());
  auto inv = at::where(nonzero, limit.div(amax), at::ones({}, amax.options()));
  auto scale = at::where(nonzero, amax.div(limit), at::ones({}, amax.options()));
  auto q = v.mul(inv).clamp_(-kMax, kMax).to(at::kFloat8_e4m3fn);
  return {q, scale};
}

// Rowwise quantisation of a 2-D `x` (see above): on a GPU, the fused kernel of ftx-kernels (one
// read of x, one byte written per element; sm_89 and newer, widths in whole 16-byte vectors)
// where it is registered and takes x, else libtorch's composition — the same bits either way.
inline std::pair<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, const at::Tensor& col_scale) {
  if (x.is_cuda() && ftx::fp8_quantize_kernel_fits(x)) return ftx::fp8_quantize_rows_kernel(x, col_scale);
  return quantize_rows_reference(x, col_scale);
}

// (q_a·s_a)·(q_b·s_b)ᵀ in `out` dtype, plus `bias` (may be undefined): q_a [m, k] and q_b [n, k]
// e4m3 (each row-major), s_a [m, 1] and s_b [n] fp32. CUDA: one FP8 GEMM (`fast_accum`: Hopper's
// faster accumulation, as the forward GEMMs of FP8 training recipes use); elsewhere in fp32.
inline at::Tensor scaled_mm(const at::Tensor& q_a, const at::Tensor& s_a, const at::Tensor& q_b, const at::Tensor& s_b,
                            const at::Tensor& bias, at::ScalarType out, bool fast_accum) {
  at::Tensor y;
  if (q_a.is_cuda()) {
    y = at::_scaled_mm(q_a, q_b.t(), s_a, s_b.view({1, -1}), std::nullopt, std::nullopt, out, fast_accum);
  } else {
    auto a = q_a.to(at::kFloat).mul_(s_a);
    auto b = q_b.to(at::kFloat).mul_(s_b.view({-1, 1}));
    y = at::mm(a, b.t()).to(out);
  }
  if (bias.defined()) y.add_(bias);
  return y;
}

// (x·diag(c)) quantised per row, times (codes·diag(code_scale))ᵀ, plus `bias`, in x's dtype: x
// [m, k] (c [k] fp32 or undefined), codes [n, k] e4m3, code_scale [n] fp32. Rows are padded with
// zeros to a multiple of 16 for the GEMM (cuBLASLt's FP8 kernels take widths in sixteens; a zero
// row quantises to zeros) and the padding's rows dropped from the product.
inline at::Tensor quantized_mm(const at::Tensor& x, const at::Tensor& c, const at::Tensor& codes,
                               const at::Tensor& code_scale, const at::Tensor& bias, bool fast_accum) {
  int64_t m = x.size(0), pad = (16 - m % 16) % 16;
  auto padded = pad == 0 ? x : at::constant_pad_nd(x, {0, 0, 0, pad});
  auto [q, s] = quantize_rows(padded, c);
  auto y = scaled_mm(q, s, codes, code_scale, bias, x.scalar_type(), fast_accum);
  return pad == 0 ? y : y.narrow(0, 0, m);
}

}  // namespace ftx::fp8
