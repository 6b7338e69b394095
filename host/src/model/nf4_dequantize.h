// NF4 dequantisation shared by the C++ autograd nodes that keep only a frozen weight's NF4
// bytes for backward (nf4_linear.cpp, dora_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ftx {

constexpr int64_t kNf4Block = 64;

// Checks that `packed` (two codes a byte) and `absmax` (one scale per block) hold a rows × cols
// weight, as every node taking NF4 bytes from Rust must before using them.
inline void check_nf4_shape(const at::Tensor& packed, const at::Tensor& absmax, int64_t rows, int64_t cols) {
  TORCH_CHECK(rows * cols == absmax.size(0) * kNf4Block && packed.numel() * 2 == rows * cols, "NF4 weight of ", rows,
              "x", cols, " does not match its ", packed.numel(), " bytes and ", absmax.size(0), " block scales");
}

// packed: uint8, two codes a byte; absmax: fp32, one per 64 values; table: fp32 [256, 2], each
// byte's two code values. The fp32 product is rounded once, on the store (as
// Nf4Weight::dequantize_into does).
inline at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& table,
                                 int64_t rows, int64_t cols, at::ScalarType kind) {
  auto out = at::empty({rows, cols}, packed.options().dtype(kind));
  auto values = table.index_select(0, packed.to(at::kInt)).view({absmax.size(0), kNf4Block});
  auto blocks = out.view({absmax.size(0), kNf4Block});
  at::mul_out(blocks, values, absmax.unsqueeze(1));
  return out;
}

}  // namespace ftx
