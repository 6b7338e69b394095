// The fused kernels' C interface (crate ftx-kernels, kernels/src/lib.rs and dispatch.rs): the
// argument blocks and the table of entry points Rust registers at start-up. Field order and
// types mirror the #[repr(C)] structs there exactly.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

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

typedef int32_t (*FtxRmsNormForwardFn)(const FtxLaunch*, const FtxRmsNormForward*, char*, int32_t);
typedef int32_t (*FtxRmsNormBackwardFn)(const FtxLaunch*, const FtxRmsNormBackward*, char*, int32_t);
typedef int32_t (*FtxRopeFn)(const FtxLaunch*, const FtxRopeArgs*, char*, int32_t);
typedef int32_t (*FtxSwigluFn)(const FtxLaunch*, const FtxSwigluArgs*, char*, int32_t);
typedef int32_t (*FtxCrossEntropyFn)(const FtxLaunch*, const FtxCrossEntropyArgs*, char*, int32_t);

struct FtxKernelTable {
  FtxRmsNormForwardFn rms_norm_forward;
  FtxRmsNormBackwardFn rms_norm_backward;
  FtxRopeFn rope;
  FtxSwigluFn swiglu;
  FtxCrossEntropyFn cross_entropy;
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
}  // namespace ftx
