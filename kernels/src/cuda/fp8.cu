
// ---------------------------------------------------------------------------------------
// Rowwise e4m3 quantisation of a GEMM operand for the frozen base's FP8 GEMMs
// (host/src/model/fp8.h; kernels/src/cuda/fp8.rs launches it). Compiled in the same NVRTC
// module, after fused.cu, whose helpers it uses (to_f, Pack, load).
//
// One block per row of x [rows, n] (row stride xs elements), c [n] float32 or null:
//   v = x·c in float32 (no c: v = x), amax = max |v| over the row (NaN when a v is NaN);
//   amax > 0: inv = 448 / amax, scale = amax / 448 (IEEE divisions); else inv = scale = 1;
//   q = e4m3(clamp(v · inv, ±448)), round to nearest even;
// q [rows, n] contiguous, one byte each; scale[row]. The same float32 operations as libtorch's
// composition (fp8.h's quantize_rows_reference), so every code and scale is bit for bit its.
// The row is read once from memory: each thread keeps its first FP8_CACHED packs in registers
// for the second pass, and reads any packs past those again (from L2) — rows wider than
// blockDim · FP8_CACHED packs only. The conversion is the hardware's (sm_89 and newer); the
// host launches this nowhere older.

#define FP8_CACHED 4
#define FP8_MAX 448.0f

// Max over the block of non-negative values (blockDim.x a multiple of 32, at most 1024); every
// thread gets it.
__device__ float fp8_block_max(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float m = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) total = m;
  }
  __syncthreads();
  return total;
}

// v = x·c (or x) for one pack starting at column `col`.
template <typename T>
__device__ __forceinline__ void fp8_values(const Pack<T>& k, const float* c, long long col, float (&v)[16 / sizeof(T)]) {
  const int N = Pack<T>::N;
  if (c != nullptr) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
      float4 f = *reinterpret_cast<const float4*>(c + col + j);
      v[j] = to_f(k.v[j]) * f.x;
      v[j + 1] = to_f(k.v[j + 1]) * f.y;
      v[j + 2] = to_f(k.v[j + 2]) * f.z;
      v[j + 3] = to_f(k.v[j + 3]) * f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = to_f(k.v[j]);
  }
}

// clamp(v · inv, ±448), a NaN kept (as at::clamp; fminf/fmaxf would drop it).
__device__ __forceinline__ float fp8_scaled(float v, float inv) {
  float t = v * inv;
  return t != t ? t : fminf(fmaxf(t, -FP8_MAX), FP8_MAX);
}

// Two e4m3 codes, `lo` in the low byte: cvt puts its first operand in the high byte.
__device__ __forceinline__ unsigned int fp8_pair(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
#else
  __trap();  // never launched below sm_89 (fp8.rs refuses it there)
  return 0;
#endif
}

// The N codes of one pack's values, as N / 4 little-endian words.
template <typename T> __device__ __forceinline__ void fp8_codes(const float (&v)[16 / sizeof(T)], float inv, unsigned int (&w)[16 / sizeof(T) / 4]) {
  const int N = Pack<T>::N;
#pragma unroll
  for (int j = 0; j < N; j += 4) {
    unsigned int lo = fp8_pair(fp8_scaled(v[j], inv), fp8_scaled(v[j + 1], inv));
    unsigned int hi = fp8_pair(fp8_scaled(v[j + 2], inv), fp8_scaled(v[j + 3], inv));
    w[j / 4] = lo | (hi << 16);
  }
}
__device__ __forceinline__ void fp8_store(unsigned char* dst, const unsigned int (&w)[1]) { *reinterpret_cast<unsigned int*>(dst) = w[0]; }
__device__ __forceinline__ void fp8_store(unsigned char* dst, const unsigned int (&w)[2]) { *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]); }

template <typename T>
__device__ void fp8_quantize_rows(const T* x, long long xs, const float* c, unsigned char* q, float* scale, long long n) {
  const int N = Pack<T>::N;
  long long row = blockIdx.x;
  long long packs = n / N;
  const T* xr = x + row * xs;
  unsigned char* qr = q + row * n;
  Pack<T> cached[FP8_CACHED];
  float v[16 / sizeof(T)];
  float m = 0.0f;
  int nan = 0;
#pragma unroll
  for (int p = 0; p < FP8_CACHED; ++p) {
    long long i = threadIdx.x + (long long)p * blockDim.x;
    if (i < packs) {
      cached[p] = load(xr + i * N);
      fp8_values(cached[p], c, i * N, v);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        m = fmaxf(m, fabsf(v[j]));
        nan |= v[j] != v[j];
      }
    }
  }
  for (long long i = threadIdx.x + (long long)FP8_CACHED * blockDim.x; i < packs; i += blockDim.x) {
    fp8_values(load(xr + i * N), c, i * N, v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      m = fmaxf(m, fabsf(v[j]));
      nan |= v[j] != v[j];
    }
  }
  // libtorch's amax keeps a NaN, and `NaN > 0` is false: such a row gets inv = scale = 1.
  nan = __syncthreads_or(nan);
  float amax = fp8_block_max(m);
  float inv = 1.0f, s = 1.0f;
  if (!nan && amax > 0.0f) {
    inv = FP8_MAX / amax;
    s = amax / FP8_MAX;
  }
  if (threadIdx.x == 0) scale[row] = s;
  unsigned int w[16 / sizeof(T) / 4];
#pragma unroll
  for (int p = 0; p < FP8_CACHED; ++p) {
    long long i = threadIdx.x + (long long)p * blockDim.x;
    if (i < packs) {
      fp8_values(cached[p], c, i * N, v);
      fp8_codes<T>(v, inv, w);
      fp8_store(qr + i * N, w);
    }
  }
  for (long long i = threadIdx.x + (long long)FP8_CACHED * blockDim.x; i < packs; i += blockDim.x) {
    fp8_values(load(xr + i * N), c, i * N, v);
    fp8_codes<T>(v, inv, w);
    fp8_store(qr + i * N, w);
  }
}

#define FTX_FP8_ENTRY(T, SUFFIX)                                                                                          \
  extern "C" __global__ void fp8_quantize_rows_##SUFFIX(const T* x, long long xs, const float* c, unsigned char* q,      \
                                                        float* scale, long long n) {                                    \
    fp8_quantize_rows<T>(x, xs, c, q, scale, n);                                                                          \
  }

FTX_FP8_ENTRY(float, f32)
FTX_FP8_ENTRY(bf16_t, bf16)
