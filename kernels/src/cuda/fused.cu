// ftx's fused elementwise kernels, compiled at run time by NVRTC (kernels/src/cuda/mod.rs).
// No header is included: NVRTC compiles this alone, bf16 handled as raw 16-bit words.
//
// Every kernel reads and writes float32 or bfloat16 (the `_f32` / `_bf16` entry points),
// accumulates in float32 and rounds once on store (round to nearest even, as c10::BFloat16).
// Loads and stores are 16-byte vectors (4 floats, 8 bf16): the host launches these only when
// the widths and every pointer and row stride allow it (mod.rs checks), else the libtorch
// composite runs instead.

typedef unsigned short bf16_t;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16_t x) { return __uint_as_float(((unsigned int)x) << 16); }

template <typename T> __device__ __forceinline__ T from_f(float f);
template <> __device__ __forceinline__ float from_f<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16_t from_f<bf16_t>(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16_t)(u >> 16);
}

// 16 bytes of T.
template <typename T> struct Pack {
  static const int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[16 / sizeof(T)];
  };
};

template <typename T> __device__ __forceinline__ Pack<T> load(const T* p) {
  Pack<T> k;
  k.raw = *reinterpret_cast<const uint4*>(p);
  return k;
}
template <typename T> __device__ __forceinline__ void store(T* p, const Pack<T>& k) {
  *reinterpret_cast<uint4*>(p) = k.raw;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int warps = blockDim.x >> 5;
    float s = lane < warps ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) total = s;
  }
  __syncthreads();
  float out = total;
  __syncthreads();  // `partial` and `total` are reused by the next call
  return out;
}

// Packs of a row one thread handles at most (the host keeps n ≤ blockDim · MAX_PACKS · N).
#define MAX_PACKS 4

// ---------------------------------------------------------------------------------------
// RMSNorm with the residual add, forward. One block per row of width n:
//   s = x + r (rounded to T: the residual stream the next layer reads; r may be null: s = x),
//   rstd = 1 / sqrt(mean(s²) + eps), y = s · rstd · (w + offset).
// Writes s (when r is given), y and rstd (float32, one per row; kept for backward).
template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* r, const T* w, T* s_out, T* y, float* rstd_out, long long n, float eps,
                             float offset) {
  const int N = Pack<T>::N;
  long long row = blockIdx.x;
  long long packs = n / N;
  const T* xr = x + row * n;
  float vals[MAX_PACKS][16 / sizeof(T)];
  float sq = 0.0f;
#pragma unroll
  for (int p = 0; p < MAX_PACKS; ++p) {
    long long i = threadIdx.x + (long long)p * blockDim.x;
    if (i < packs) {
      Pack<T> a = load(xr + i * N);
      if (r != nullptr) {
        Pack<T> b = load(r + row * n + i * N);
        Pack<T> sum;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          sum.v[j] = from_f<T>(to_f(a.v[j]) + to_f(b.v[j]));
          vals[p][j] = to_f(sum.v[j]);
        }
        store(s_out + row * n + i * N, sum);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) vals[p][j] = to_f(a.v[j]);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) sq += vals[p][j] * vals[p][j];
    }
  }
  float rstd = rsqrtf(block_sum(sq) / (float)n + eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
#pragma unroll
  for (int p = 0; p < MAX_PACKS; ++p) {
    long long i = threadIdx.x + (long long)p * blockDim.x;
    if (i < packs) {
      Pack<T> wk = load(w + i * N);
      Pack<T> out;
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = from_f<T>(vals[p][j] * rstd * (to_f(wk.v[j]) + offset));
      store(y + row * n + i * N, out);
    }
  }
}

// RMSNorm (with the residual add) backward. Blocks stride over the rows; per row, with
// n̂ = s · rstd and g = dy · (w + offset):
//   ds = rstd · (g − n̂ · mean(g · n̂)) + ds_in   (ds_in: the gradient reaching s directly, may be null)
// written to dx (the gradient of x and of r alike). With `dw_partial` (a [gridDim.x, n] float32
// workspace), each block also writes its rows' Σ dy · n̂ per column: rms_norm_dw sums those in a
// fixed order (deterministic, no atomics).
template <typename T>
__device__ void rms_norm_bwd(const T* s, const T* w, const float* rstd_in, const T* dy, const T* ds_in, T* dx, float* dw_partial,
                             long long rows, long long n, float offset) {
  const int N = Pack<T>::N;
  long long packs = n / N;
  float wv[MAX_PACKS][16 / sizeof(T)];
  float dw[MAX_PACKS][16 / sizeof(T)];
#pragma unroll
  for (int p = 0; p < MAX_PACKS; ++p) {
    long long i = threadIdx.x + (long long)p * blockDim.x;
#pragma unroll
    for (int j = 0; j < N; ++j) dw[p][j] = 0.0f;
    if (i < packs) {
      Pack<T> wk = load(w + i * N);
#pragma unroll
      for (int j = 0; j < N; ++j) wv[p][j] = to_f(wk.v[j]) + offset;
    }
  }
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    float rstd = rstd_in[row];
    float nh[MAX_PACKS][16 / sizeof(T)];
    float g[MAX_PACKS][16 / sizeof(T)];
    float dot = 0.0f;
#pragma unroll
    for (int p = 0; p < MAX_PACKS; ++p) {
      long long i = threadIdx.x + (long long)p * blockDim.x;
      if (i < packs) {
        Pack<T> sk = load(s + row * n + i * N);
        Pack<T> dk = load(dy + row * n + i * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          float d = to_f(dk.v[j]);
          nh[p][j] = to_f(sk.v[j]) * rstd;
          g[p][j] = d * wv[p][j];
          dot += g[p][j] * nh[p][j];
          dw[p][j] += d * nh[p][j];
        }
      }
    }
    float mean = block_sum(dot) / (float)n;
#pragma unroll
    for (int p = 0; p < MAX_PACKS; ++p) {
      long long i = threadIdx.x + (long long)p * blockDim.x;
      if (i < packs) {
        Pack<T> out;
        Pack<T> extra;
        if (ds_in != nullptr) extra = load(ds_in + row * n + i * N);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          float v = rstd * (g[p][j] - nh[p][j] * mean);
          if (ds_in != nullptr) v += to_f(extra.v[j]);
          out.v[j] = from_f<T>(v);
        }
        store(dx + row * n + i * N, out);
      }
    }
  }
  if (dw_partial != nullptr) {
#pragma unroll
    for (int p = 0; p < MAX_PACKS; ++p) {
      long long i = threadIdx.x + (long long)p * blockDim.x;
      if (i < packs) {
#pragma unroll
        for (int j = 0; j < N; ++j) dw_partial[(long long)blockIdx.x * n + i * N + j] = dw[p][j];
      }
    }
  }
}

// dw[c] = Σ_b partial[b, c], summed in order of b (one thread per column).
template <typename T> __device__ void rms_norm_dw(const float* partial, T* dw, long long blocks, long long n) {
  long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float acc = 0.0f;
  for (long long b = 0; b < blocks; ++b) acc += partial[b * n + c];
  dw[c] = from_f<T>(acc);
}

// ---------------------------------------------------------------------------------------
// Rotary position embedding on q and k together, one block per token (b, t), the first `rot`
// of each head's `hd` dimensions rotated (the rest copied: partial rotary). With h = rot / 2,
// as transformers' `x·cos + rotate_half(x)·sin`:
//   out[i]     = x[i]·cos[i]         − x[i+h]·sin[i]
//   out[i+h]   = x[i+h]·cos[i+h]     + x[i]·sin[i+h]
// and `inverse` (the backward: the transposed rotation, applied to the output's gradient):
//   out[i]     = x[i]·cos[i]         + x[i+h]·sin[i+h]
//   out[i+h]   = x[i+h]·cos[i+h]     − x[i]·sin[i]
// Inputs are [B, T, heads, hd] with any strides for B, T and heads (elements; the last dimension
// contiguous); outputs are contiguous [B, T, heads, hd]; cos/sin [B, T, rot] with strides
// (cb, ct). k may be null (q alone).
template <typename T>
__device__ void rope(const T* q, long long qb, long long qt, long long qh, const T* k, long long kb, long long kt, long long kh,
                     T* q_out, T* k_out, const T* cos, const T* sin, long long cb, long long ct, long long tokens, int qheads,
                     int kheads, int hd, int rot, int inverse) {
  const int N = Pack<T>::N;
  long long tok = blockIdx.x;
  long long b = tok / tokens, t = tok % tokens;
  int half = rot / 2;
  int pair_packs = half / N, pass_packs = (hd - rot) / N;
  int per_head = pair_packs + pass_packs;
  int heads = qheads + (k != nullptr ? kheads : 0);
  const T* c = cos + b * cb + t * ct;
  const T* sn = sin + b * cb + t * ct;
  for (int item = threadIdx.x; item < heads * per_head; item += blockDim.x) {
    int head = item / per_head, part = item % per_head;
    const T* src;
    T* dst;
    if (head < qheads) {
      src = q + b * qb + t * qt + (long long)head * qh;
      dst = q_out + (tok * qheads + head) * (long long)hd;
    } else {
      int kh_i = head - qheads;
      src = k + b * kb + t * kt + (long long)kh_i * kh;
      dst = k_out + (tok * kheads + kh_i) * (long long)hd;
    }
    if (part >= pair_packs) {  // beyond the rotary dimensions: copied
      int off = rot + (part - pair_packs) * N;
      store(dst + off, load(src + off));
      continue;
    }
    int i0 = part * N;
    Pack<T> x1 = load(src + i0), x2 = load(src + i0 + half);
    Pack<T> c1 = load(c + i0), c2 = load(c + i0 + half);
    Pack<T> s1 = load(sn + i0), s2 = load(sn + i0 + half);
    Pack<T> o1, o2;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float a = to_f(x1.v[j]), bb = to_f(x2.v[j]);
      if (inverse) {
        o1.v[j] = from_f<T>(a * to_f(c1.v[j]) + bb * to_f(s2.v[j]));
        o2.v[j] = from_f<T>(bb * to_f(c2.v[j]) - a * to_f(s1.v[j]));
      } else {
        o1.v[j] = from_f<T>(a * to_f(c1.v[j]) - bb * to_f(s1.v[j]));
        o2.v[j] = from_f<T>(bb * to_f(c2.v[j]) + a * to_f(s2.v[j]));
      }
    }
    store(dst + i0, o1);
    store(dst + i0 + half, o2);
  }
}

// ---------------------------------------------------------------------------------------
// SwiGLU on the fused gate/up output gu = [g | u] ([rows, 2·inner], row stride `gu_stride`):
//   forward  h = silu(g) · u                                   ([rows, inner], contiguous)
//   backward dg = dh · u · σ(g) · (1 + g · (1 − σ(g))), du = dh · silu(g)   (dgu [rows, 2·inner],
//            contiguous; dh [rows, inner], row stride `dh_stride`), silu recomputed from g.
__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + __expf(-g)); }

template <typename T> __device__ void swiglu_fwd(const T* gu, long long gu_stride, T* h, long long rows, long long inner) {
  const int N = Pack<T>::N;
  long long per_row = inner / N, total = rows * per_row;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    long long r = i / per_row, c = (i % per_row) * N;
    Pack<T> g = load(gu + r * gu_stride + c), u = load(gu + r * gu_stride + inner + c);
    Pack<T> out;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float gf = to_f(g.v[j]);
      out.v[j] = from_f<T>(gf * sigmoid(gf) * to_f(u.v[j]));
    }
    store(h + r * inner + c, out);
  }
}

template <typename T>
__device__ void swiglu_bwd(const T* gu, long long gu_stride, const T* dh, long long dh_stride, T* dgu, long long rows, long long inner) {
  const int N = Pack<T>::N;
  long long per_row = inner / N, total = rows * per_row;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    long long r = i / per_row, c = (i % per_row) * N;
    Pack<T> g = load(gu + r * gu_stride + c), u = load(gu + r * gu_stride + inner + c), d = load(dh + r * dh_stride + c);
    Pack<T> dg, du;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float gf = to_f(g.v[j]), uf = to_f(u.v[j]), df = to_f(d.v[j]);
      float sg = sigmoid(gf);
      dg.v[j] = from_f<T>(df * uf * sg * (1.0f + gf * (1.0f - sg)));
      du.v[j] = from_f<T>(df * gf * sg);
    }
    store(dgu + r * 2 * inner + c, dg);
    store(dgu + r * 2 * inner + inner + c, du);
  }
}

// ---------------------------------------------------------------------------------------
// Entry points, one per kernel and element type (names looked up by mod.rs).
#define FTX_ENTRY(T, SUFFIX)                                                                                                  \
  extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T* x, const T* r, const T* w, T* s_out, T* y, float* rstd, long long n, \
                                                   float eps, float offset) {                                                 \
    rms_norm_fwd<T>(x, r, w, s_out, y, rstd, n, eps, offset);                                                                 \
  }                                                                                                                           \
  extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T* s, const T* w, const float* rstd, const T* dy, const T* ds_in,      \
                                                   T* dx, float* dw_partial, long long rows, long long n, float offset) {     \
    rms_norm_bwd<T>(s, w, rstd, dy, ds_in, dx, dw_partial, rows, n, offset);                                                  \
  }                                                                                                                           \
  extern "C" __global__ void rms_norm_dw_##SUFFIX(const float* partial, T* dw, long long blocks, long long n) {               \
    rms_norm_dw<T>(partial, dw, blocks, n);                                                                                   \
  }                                                                                                                           \
  extern "C" __global__ void rope_##SUFFIX(const T* q, long long qb, long long qt, long long qh, const T* k, long long kb,      \
                                           long long kt, long long kh, T* q_out, T* k_out, const T* cos, const T* sin,        \
                                           long long cb, long long ct, long long tokens, int qheads, int kheads, int hd,      \
                                           int rot, int inverse) {                                                            \
    rope<T>(q, qb, qt, qh, k, kb, kt, kh, q_out, k_out, cos, sin, cb, ct, tokens, qheads, kheads, hd, rot, inverse);          \
  }                                                                                                                           \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* gu, long long gu_stride, T* h, long long rows, long long inner) {   \
    swiglu_fwd<T>(gu, gu_stride, h, rows, inner);                                                                             \
  }                                                                                                                           \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* gu, long long gu_stride, const T* dh, long long dh_stride, T* dgu,  \
                                                 long long rows, long long inner) {                                           \
    swiglu_bwd<T>(gu, gu_stride, dh, dh_stride, dgu, rows, inner);                                                           \
  }

FTX_ENTRY(float, f32)
FTX_ENTRY(bf16_t, bf16)
