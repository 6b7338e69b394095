
// ---------------------------------------------------------------------------------------
// Cross-entropy of a chunk of LM-head logits, loss and gradient in one kernel
// (kernels/src/cuda/cross_entropy.rs launches it). Compiled in the same NVRTC module, after
// fused.cu, whose helpers it uses (to_f, from_f, Pack, load, store).
//
// One block per row of z [rows, V] (row stride zs elements), target t = targets[row]:
//   x = z, or c·tanh(z/c) with soft-capping (cap > 0), in float32 (transformers upcasts the
//   logits to float32 before the softmax);
//   lse = log Σ exp(x), in one pass: a running max and rescaled sum per thread, then over the
//   block;
//   loss[row] = lse − x_t;
//   with g: g = (exp(x − lse) − [j = t]) · scale · (1 − tanh²(z/c) when capped), rounded once
//   to T; g may be z itself (in place): each thread rewrites only the elements it read, after
//   the whole row's sum is known.
// A row whose target is `ignore` gets loss 0 and a zero gradient; a target outside [0, V) gets
// a NaN loss (and no one-hot term). NaN logits give a NaN loss, as libtorch's log_softmax does.
// Rows are read in 16-byte packs between a scalar head (up to the row's first 16-byte
// boundary) and a scalar tail; g's rows share z's alignment (the host checks).

#define CE_NEG_INF __int_as_float(0xff800000)
#define CE_NAN __int_as_float(0x7fc00000)

// Maximum that keeps a NaN (fmaxf would drop it).
__device__ __forceinline__ float ce_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float ce_cap(float z, float cap) { return cap > 0.0f ? cap * tanhf(z / cap) : z; }

// Folds (m2, s2) into the running (m, s), s being Σ exp(x − m) over the values folded so far.
__device__ __forceinline__ void ce_fold(float& m, float& s, float m2, float s2) {
  float mn = ce_max(m, m2);
  if (mn == CE_NEG_INF) return;  // nothing but −∞ so far: the sum stays 0
  s = (m == CE_NEG_INF ? 0.0f : s * expf(m - mn)) + (m2 == CE_NEG_INF ? 0.0f : s2 * expf(m2 - mn));
  m = mn;
}

// (m, s) over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ void ce_block_fold(float& m, float& s) {
  __shared__ float part_m[32], part_s[32];
  __shared__ float total_m, total_s;
  for (int o = 16; o > 0; o >>= 1) ce_fold(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    part_m[warp] = m;
    part_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    int warps = blockDim.x >> 5;
    float wm = lane < warps ? part_m[lane] : CE_NEG_INF;
    float ws = lane < warps ? part_s[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) ce_fold(wm, ws, __shfl_xor_sync(0xffffffffu, wm, o), __shfl_xor_sync(0xffffffffu, ws, o));
    if (lane == 0) {
      total_m = wm;
      total_s = ws;
    }
  }
  __syncthreads();
  m = total_m;
  s = total_s;
}

// d loss / d z of element j (the caller scales the loss by `scale`).
__device__ __forceinline__ float ce_grad(float z, long long j, long long t, float lse, float scale, float cap) {
  float x = z, slope = 1.0f;
  if (cap > 0.0f) {
    float th = tanhf(z / cap);
    x = cap * th;
    slope = 1.0f - th * th;
  }
  float d = expf(x - lse) - (j == t ? 1.0f : 0.0f);
  return d * scale * slope;
}

template <typename T>
__device__ void cross_entropy(const T* z, long long zs, const long long* targets, float* loss, T* g, long long gs, long long V,
                              float scale, float cap, long long ignore) {
  const int N = Pack<T>::N;
  long long row = blockIdx.x;
  const T* zr = z + row * zs;
  long long t = targets[row];
  bool ignored = t == ignore;
  // The row's scalar head (elements before its first 16-byte boundary), packs, and tail.
  long long head = (long long)(((16u - (unsigned)((unsigned long long)zr & 15u)) & 15u) / sizeof(T));
  if (head > V) head = V;
  long long packs = (V - head) / N;
  long long body_end = head + packs * N;
  __shared__ float s_lse;
  float lse = 0.0f;
  if (!ignored) {
    float m = CE_NEG_INF, s = 0.0f;
    for (long long j = threadIdx.x; j < head; j += blockDim.x) ce_fold(m, s, ce_cap(to_f(zr[j]), cap), 1.0f);
    for (long long j = body_end + threadIdx.x; j < V; j += blockDim.x) ce_fold(m, s, ce_cap(to_f(zr[j]), cap), 1.0f);
    for (long long p = threadIdx.x; p < packs; p += blockDim.x) {
      Pack<T> k = load(zr + head + p * N);
      float v[16 / sizeof(T)];
      float pm = CE_NEG_INF;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        v[i] = ce_cap(to_f(k.v[i]), cap);
        pm = ce_max(pm, v[i]);
      }
      float mn = ce_max(m, pm);
      if (mn != CE_NEG_INF) {
        float add = 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) add += expf(v[i] - mn);
        s = (m == CE_NEG_INF ? 0.0f : s * expf(m - mn)) + add;
        m = mn;
      }
    }
    // The target's logit, read before the block's barriers (and so before any in-place write).
    float xt = 0.0f;
    if (threadIdx.x == 0) xt = (t >= 0 && t < V) ? ce_cap(to_f(zr[t]), cap) : CE_NAN;
    ce_block_fold(m, s);
    lse = m + logf(s);
    if (threadIdx.x == 0) {
      loss[row] = lse - xt;
      s_lse = lse;
    }
    __syncthreads();
    lse = s_lse;
  } else if (threadIdx.x == 0) {
    loss[row] = 0.0f;
  }
  if (g == nullptr) return;
  T* gr = g + row * gs;
  for (long long j = threadIdx.x; j < head; j += blockDim.x)
    gr[j] = from_f<T>(ignored ? 0.0f : ce_grad(to_f(zr[j]), j, t, lse, scale, cap));
  for (long long j = body_end + threadIdx.x; j < V; j += blockDim.x)
    gr[j] = from_f<T>(ignored ? 0.0f : ce_grad(to_f(zr[j]), j, t, lse, scale, cap));
  for (long long p = threadIdx.x; p < packs; p += blockDim.x) {
    long long j0 = head + p * N;
    Pack<T> out;
    if (ignored) {
#pragma unroll
      for (int i = 0; i < N; ++i) out.v[i] = from_f<T>(0.0f);
    } else {
      Pack<T> k = load(zr + j0);
#pragma unroll
      for (int i = 0; i < N; ++i) out.v[i] = from_f<T>(ce_grad(to_f(k.v[i]), j0 + i, t, lse, scale, cap));
    }
    store(gr + j0, out);
  }
}

#define FTX_CE_ENTRY(T, SUFFIX)                                                                                            \
  extern "C" __global__ void cross_entropy_##SUFFIX(const T* z, long long zs, const long long* targets, float* loss, T* g,   \
                                                    long long gs, long long V, float scale, float cap, long long ignore) { \
    cross_entropy<T>(z, zs, targets, loss, g, gs, V, scale, cap, ignore);                                                  \
  }

FTX_CE_ENTRY(float, f32)
FTX_CE_ENTRY(bf16_t, bf16)
