// The fused kernels' C interface (crate ftx-kernels, kernels/src/lib.rs and dispatch.rs): the
// argument blocks and the table of entry points Rust registers at start-up. Field order and
// types mirror the #[repr(C)] structs there exactly.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <string>
#include <utility>

extern "C" {
struct FtxLaunch {
  int32_t device;  // -1: CPU (the reference versions); N: CUDA device N
  int32_t dtype;   // 0 float32, 1 bfloat16
  void* stream;    // cudaStream_t
};

struct FtxRmsNormForward {
  const void* x;
  const void* residual;
  const void* weight;
  void* sum;
  void* y;
  float* rstd;
  int64_t rows, n;
  float eps, offset;
};

struct FtxRmsNormBackward {
  const void* sum;
  const void* weight;
  const float* rstd;
  const void* dy;
  const void* dsum;
  void* dx;
  void* dw;
  float* workspace;
  int64_t blocks, rows, n;
  float offset;
};

struct FtxRopeArgs {
  const void* q;
  int64_t q_strides[3];
  const void* k;
  int64_t k_strides[3];
  void* q_out;
  void* k_out;
  const void* cos;
  const void* sin;
  int64_t cos_strides[2];
  int64_t batch, tokens;
  int32_t q_heads, k_heads, head_dim, rot, inverse;
};

struct FtxSwigluArgs {
  const void* gu;
  int64_t gu_stride;
  const void* dh;
  int64_t dh_stride;
  void* out;
  int64_t rows, inner;
};

struct FtxCrossEntropyArgs {
  const void* logits;
  int64_t logits_stride;
  const int64_t* targets;
  float* loss;
  void* grad;  // null: the loss alone; == logits: in place
  int64_t grad_stride;
  int64_t rows, vocab, ignore_index;
  float scale, softcap;
};

// Rowwise e4m3 quantisation (ftx::fp8, model/fp8.h): x [rows, n] at row stride x_stride
// elements, col_scale [n] float32 or null; q [rows, n] e4m3 codes, scale [rows] float32.
struct FtxFp8QuantizeRows {
  const void* x;
  int64_t x_stride;
  const float* col_scale;
  uint8_t* q;
  float* scale;
  int64_t rows, n;
};

typedef int32_t (*FtxRmsNormForwardFn)(const FtxLaunch*, const FtxRmsNormForward*, char*, int32_t);
typedef int32_t (*FtxRmsNormBackwardFn)(const FtxLaunch*, const FtxRmsNormBackward*, char*, int32_t);
typedef int32_t (*FtxRopeFn)(const FtxLaunch*, const FtxRopeArgs*, char*, int32_t);
typedef int32_t (*FtxSwigluFn)(const FtxLaunch*, const FtxSwigluArgs*, char*, int32_t);
typedef int32_t (*FtxCrossEntropyFn)(const FtxLaunch*, const FtxCrossEntropyArgs*, char*, int32_t);
typedef int32_t (*FtxFp8QuantizeRowsFn)(const FtxLaunch*, const FtxFp8QuantizeRows*, char*, int32_t);

struct FtxKernelTable {
  FtxRmsNormForwardFn rms_norm_forward;
  FtxRmsNormBackwardFn rms_norm_backward;
  FtxRopeFn rope;
  FtxSwigluFn swiglu;
  FtxCrossEntropyFn cross_entropy;
  FtxFp8QuantizeRowsFn fp8_quantize_rows;
  // 0 when fp8_quantize_rows would run the call (outputs may be null), else -1 and why not.
  FtxFp8QuantizeRowsFn fp8_quantize_rows_fits;
};
}

namespace ftx {
// The registered table, or null before Rust registers it.
const FtxKernelTable* kernel_table();
// Device, element type and libtorch's current stream for `t` (throws on other element types).
FtxLaunch launch_of(const at::Tensor& t);
// Throws with the kernel's message when `rc` is not 0.
void check_kernel(int32_t rc, const char* what, const char* err);
// True when `gu` (float32 or bf16, last dimension contiguous) can run the SwiGLU kernels.
bool swiglu_kernel_fits(const at::Tensor& gu);
// SwiGLU through the kernel table: h = silu(g)·u, and dgu from dh (see ftx-kernels).
at::Tensor swiglu_kernel_forward(const at::Tensor& gu);
at::Tensor swiglu_kernel_backward(const at::Tensor& gu, const at::Tensor& dh);
// True when the rowwise e4m3 quantisation kernel takes `x` (2-D, float32 or bf16, last dimension
// contiguous; on CUDA: sm_89 or newer, the width and row stride in whole 16-byte vectors, x
// 16-byte aligned); false also when the kernel table is not registered. `why`, when given,
// gets the reason it does not.
bool fp8_quantize_kernel_fits(const at::Tensor& x, std::string* why = nullptr);
// Rowwise e4m3 quantisation of `x` through the kernel table (see ftx::fp8::quantize_rows; the
// CUDA kernel on a GPU, the CPU reference on host tensors): {q [rows, n] e4m3, scale [rows, 1]
// float32}. `col_scale` [n] may be undefined. Throws when the kernel does not take `x`.
std::pair<at::Tensor, at::Tensor> fp8_quantize_rows_kernel(const at::Tensor& x, const at::Tensor& col_scale);
}  // namespace ftx
