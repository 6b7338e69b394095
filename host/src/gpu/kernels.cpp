// Autograd nodes over ftx's fused kernels (crate ftx-kernels): RMSNorm with the residual add and
// rotary embedding of q and k, each a torch::autograd::Function whose forward and backward call
// the kernel table Rust registered (src/gpu/kernels.rs), on libtorch's current CUDA stream (or
// on the CPU reference versions for host tensors). Also the SwiGLU helpers swiglu.cpp uses, and
// the rowwise e4m3 quantisation model/fp8.h runs before each FP8 GEMM.
// Called from Rust on tch's tensors (at::Tensor*); every entry point catches C++ exceptions.
#include "kernels.h"
#include "ledger.h"
#include "../model/fp8.h"

#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {
std::atomic<const FtxKernelTable*> g_table{nullptr};
constexpr int32_t kErrLen = 512;

void write_error(char* err, int32_t len, const char* what) {
  if (err && len > 0) std::snprintf(err, static_cast<size_t>(len), "%s", what);
}

const FtxKernelTable& table() {
  auto t = ftx::kernel_table();
  if (t == nullptr) throw std::runtime_error("the fused kernels are not registered (ftx::gpu::kernels::register)");
  return *t;
}

// A 16-byte-aligned contiguous copy-free view when possible.
at::Tensor contig(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// ---- RMSNorm (with the residual add) ------------------------------------------------------

// Runs the forward kernel; `r` undefined: no residual add (then `sum` is not written).
void rms_forward(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, double eps, double offset, at::Tensor& sum,
                 at::Tensor& y, at::Tensor& rstd) {
  int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  y = at::empty_like(x, at::MemoryFormat::Contiguous);
  rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (r.defined()) sum = at::empty_like(x, at::MemoryFormat::Contiguous);
  FtxRmsNormForward a{x.data_ptr(), r.defined() ? r.data_ptr() : nullptr, w.data_ptr(), r.defined() ? sum.data_ptr() : nullptr,
                      y.data_ptr(), rstd.data_ptr<float>(), rows, n, static_cast<float>(eps), static_cast<float>(offset)};
  auto l = ftx::launch_of(x);
  char err[kErrLen] = {0};
  ftx::KernelRecord record("ftx::kernel::rms_norm_forward", {x, r, w}, {sum, y, rstd});
  ftx::check_kernel(table().rms_norm_forward(&l, &a, err, kErrLen), "rms_norm forward", err);
}

// dx (the gradient of the norm's input, and of the residual) and, when `want_dw`, dw.
std::pair<at::Tensor, at::Tensor> rms_backward(const at::Tensor& sum, const at::Tensor& w, const at::Tensor& rstd, const at::Tensor& dy_in,
                                               const at::Tensor& ds_in, double offset, bool want_dw) {
  int64_t n = sum.size(-1), rows = sum.numel() / std::max<int64_t>(n, 1);
  auto dy = contig(dy_in);
  at::Tensor ds = ds_in.defined() ? contig(ds_in) : at::Tensor();
  auto dx = at::empty_like(sum, at::MemoryFormat::Contiguous);
  at::Tensor dw, workspace;
  // Row blocks of the CUDA kernel's dw pass: each writes one row of per-column sums.
  int64_t blocks = std::min<int64_t>(std::max<int64_t>(rows, 1), 256);
  if (want_dw) {
    dw = at::empty_like(w, at::MemoryFormat::Contiguous);
    if (sum.is_cuda()) workspace = at::empty({blocks, n}, sum.options().dtype(at::kFloat));
  }
  FtxRmsNormBackward a{sum.data_ptr(),
                       w.data_ptr(),
                       rstd.data_ptr<float>(),
                       dy.data_ptr(),
                       ds.defined() ? ds.data_ptr() : nullptr,
                       dx.data_ptr(),
                       want_dw ? dw.data_ptr() : nullptr,
                       workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                       blocks,
                       rows,
                       n,
                       static_cast<float>(offset)};
  auto l = ftx::launch_of(sum);
  char err[kErrLen] = {0};
  ftx::KernelRecord record("ftx::kernel::rms_norm_backward", {sum, w, rstd, dy, ds}, {dx, dw});
  ftx::check_kernel(table().rms_norm_backward(&l, &a, err, kErrLen), "rms_norm backward", err);
  return {dx, dw};
}

// y = rms_norm(x) · (w + offset), returning {x, y}: x passed on (a view of it), so that where
// the caller continues the residual stream from the returned x, the stream's gradient comes back
// to this node and the backward kernel adds it into dx in its one pass — instead of autograd
// summing the two gradients of x with a separate full-width add (issue 15's step ledger). A
// caller that only wants y drops the first output (its gradient then stays undefined). Saves x,
// w and rstd.
struct RmsNormNode : public torch::autograd::Function<RmsNormNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_in, double eps, double offset) {
    RECORD_USER_SCOPE("ftx::rms_norm");
    auto x = contig(x_in), w = contig(w_in);
    at::Tensor sum, y, rstd;
    rms_forward(x, at::Tensor(), w, eps, offset, sum, y, rstd);
    ctx->save_for_backward({x, w, rstd});
    ctx->saved_data["offset"] = offset;
    return {x_in, y};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& ds = grads[0];
    const auto& dy = grads[1];
    if (!dy.defined()) return {ds, at::Tensor(), at::Tensor(), at::Tensor()};
    auto [dx, dw] = rms_backward(saved[0], saved[1], saved[2], dy, ds, ctx->saved_data["offset"].toDouble(), ctx->needs_input_grad(1));
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

// s = x + r, y = rms_norm(s) · (w + offset); returns {s, y}; saves s, w and rstd. The gradient of
// s from both outputs is one kernel's output, given to x and r alike.
struct AddRmsNormNode : public torch::autograd::Function<AddRmsNormNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& r_in, const at::Tensor& w_in, double eps,
                               double offset) {
    RECORD_USER_SCOPE("ftx::add_rms_norm");
    auto x = contig(x_in), r = contig(r_in), w = contig(w_in);
    at::Tensor sum, y, rstd;
    rms_forward(x, r, w, eps, offset, sum, y, rstd);
    ctx->save_for_backward({sum, w, rstd});
    ctx->saved_data["offset"] = offset;
    return {sum, y};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& ds = grads[0];
    const auto& dy = grads[1];
    if (!dy.defined()) return {ds, ds, at::Tensor(), at::Tensor(), at::Tensor()};
    auto [dx, dw] = rms_backward(saved[0], saved[1], saved[2], dy, ds, ctx->saved_data["offset"].toDouble(), ctx->needs_input_grad(2));
    return {dx, dx, dw, at::Tensor(), at::Tensor()};
  }
};

// ---- Rotary embedding ---------------------------------------------------------------------

// q, k: [B, T, heads, hd] (last dimension contiguous); cos, sin: [B, T, rot]. Outputs contiguous.
std::pair<at::Tensor, at::Tensor> rope_run(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos, const at::Tensor& sin,
                                           bool inverse) {
  auto last = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  auto q = last(q_in);
  at::Tensor k = k_in.defined() ? last(k_in) : at::Tensor();
  if (q.dim() != 4 || (k.defined() && k.dim() != 4) || cos.dim() != 3 || cos.stride(-1) != 1 || sin.strides() != cos.strides())
    throw std::invalid_argument("rope: q and k must be [B, T, heads, head_dim], cos and sin [B, T, rot] alike");
  if ((cos.size(0) != 1 && cos.size(0) != q.size(0)) || cos.size(1) != q.size(1) || cos.size(2) > q.size(3))
    throw std::invalid_argument("rope: cos and sin do not match q's batch, tokens or head_dim");
  auto q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = k.defined() ? at::empty(k.sizes(), k.options()) : at::Tensor();
  FtxRopeArgs a{};
  a.q = q.data_ptr();
  for (int i = 0; i < 3; ++i) a.q_strides[i] = q.stride(i);
  a.k = k.defined() ? k.data_ptr() : nullptr;
  for (int i = 0; i < 3; ++i) a.k_strides[i] = k.defined() ? k.stride(i) : 0;
  a.q_out = q_out.data_ptr();
  a.k_out = k.defined() ? k_out.data_ptr() : nullptr;
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.cos_strides[0] = cos.size(0) == 1 ? 0 : cos.stride(0);
  a.cos_strides[1] = cos.stride(1);
  a.batch = q.size(0);
  a.tokens = q.size(1);
  a.q_heads = static_cast<int32_t>(q.size(2));
  a.k_heads = k.defined() ? static_cast<int32_t>(k.size(2)) : 0;
  a.head_dim = static_cast<int32_t>(q.size(3));
  a.rot = static_cast<int32_t>(cos.size(2));
  a.inverse = inverse ? 1 : 0;
  auto l = ftx::launch_of(q);
  char err[kErrLen] = {0};
  ftx::KernelRecord record(inverse ? "ftx::kernel::rope_backward" : "ftx::kernel::rope_forward", {q, k, cos, sin}, {q_out, k_out});
  ftx::check_kernel(table().rope(&l, &a, err, kErrLen), inverse ? "rope backward" : "rope forward", err);
  return {q_out, k_out};
}

struct RopeNode : public torch::autograd::Function<RopeNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
    RECORD_USER_SCOPE("ftx::rope");
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["q_shape"] = q.sizes().vec();
    auto [qo, ko] = rope_run(q, k, cos, sin, false);
    return {qo, ko};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto dq = grads[0], dk = grads[1];
    if (!dq.defined() && !dk.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    if (!dq.defined()) dq = at::zeros(ctx->saved_data["q_shape"].toIntVector(), dk.options());
    auto [gq, gk] = rope_run(contig(dq), dk.defined() ? contig(dk) : at::Tensor(), saved[0], saved[1], true);
    return {gq, gk, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

namespace ftx {
const FtxKernelTable* kernel_table() { return g_table.load(std::memory_order_acquire); }

FtxLaunch launch_of(const at::Tensor& t) {
  FtxLaunch l{-1, 0, nullptr};
  if (t.scalar_type() == at::kFloat) {
    l.dtype = 0;
  } else if (t.scalar_type() == at::kBFloat16) {
    l.dtype = 1;
  } else {
    throw std::invalid_argument(std::string("the fused kernels take float32 or bfloat16, not ") + c10::toString(t.scalar_type()));
  }
  if (t.is_cuda()) {
    l.device = t.get_device();
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    l.stream = impl.getStream(t.device()).native_handle();
  } else if (!t.is_cpu()) {
    throw std::invalid_argument("the fused kernels run on CUDA or CPU tensors");
  }
  return l;
}

void check_kernel(int32_t rc, const char* what, const char* err) {
  if (rc != 0) throw std::runtime_error(std::string(what) + ": " + err);
}

bool swiglu_kernel_fits(const at::Tensor& gu) {
  if (kernel_table() == nullptr || gu.dim() < 1) return false;
  auto st = gu.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16) return false;
  if (!gu.is_cuda() && !gu.is_cpu()) return false;
  int64_t vec = st == at::kFloat ? 4 : 8;
  int64_t width = gu.size(-1);
  if (width % (2 * vec) != 0) return false;
  // The kernel reads rows at one stride: a contiguous tensor (made so below when it is not).
  if (gu.is_contiguous()) return reinterpret_cast<uintptr_t>(gu.data_ptr()) % 16 == 0;
  return true;
}

at::Tensor swiglu_kernel_forward(const at::Tensor& gu_in) {
  auto gu = contig(gu_in);
  int64_t inner = gu.size(-1) / 2, rows = gu.numel() / std::max<int64_t>(gu.size(-1), 1);
  auto sizes = gu.sizes().vec();
  sizes.back() = inner;
  auto h = at::empty(sizes, gu.options());
  FtxSwigluArgs a{gu.data_ptr(), 2 * inner, nullptr, 0, h.data_ptr(), rows, inner};
  auto l = launch_of(gu);
  char err[kErrLen] = {0};
  KernelRecord record("ftx::kernel::swiglu_forward", {gu}, {h});
  check_kernel(table().swiglu(&l, &a, err, kErrLen), "swiglu forward", err);
  return h;
}

at::Tensor swiglu_kernel_backward(const at::Tensor& gu_in, const at::Tensor& dh_in) {
  auto gu = contig(gu_in);
  auto dh = contig(dh_in);
  int64_t inner = gu.size(-1) / 2, rows = gu.numel() / std::max<int64_t>(gu.size(-1), 1);
  auto dgu = at::empty_like(gu, at::MemoryFormat::Contiguous);
  FtxSwigluArgs a{gu.data_ptr(), 2 * inner, dh.data_ptr(), inner, dgu.data_ptr(), rows, inner};
  auto l = launch_of(gu);
  char err[kErrLen] = {0};
  KernelRecord record("ftx::kernel::swiglu_backward", {gu, dh}, {dgu});
  check_kernel(table().swiglu(&l, &a, err, kErrLen), "swiglu backward", err);
  return dgu;
}

namespace {
// The kernel's argument block for x (outputs null), its row stride that of a 2-D x whose last
// dimension is contiguous (a single row's stride is arbitrary in libtorch: n then).
FtxFp8QuantizeRows fp8_args(const at::Tensor& x) {
  int64_t rows = x.size(0), n = x.size(1);
  return FtxFp8QuantizeRows{x.data_ptr(), rows <= 1 ? n : x.stride(0), nullptr, nullptr, nullptr, rows, n};
}

bool fp8_input_ok(const at::Tensor& x) {
  auto st = x.scalar_type();
  return x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1 && (st == at::kFloat || st == at::kBFloat16) && (x.is_cuda() || x.is_cpu());
}
}  // namespace

bool fp8_quantize_kernel_fits(const at::Tensor& x, std::string* why) {
  auto t = kernel_table();
  if (t == nullptr || !fp8_input_ok(x)) {
    if (why) *why = t == nullptr ? "the kernel table is not registered" : "x is not a 2-D float32 or bf16 tensor with contiguous rows";
    return false;
  }
  auto a = fp8_args(x);
  auto l = launch_of(x);
  char err[kErrLen] = {0};
  bool fits = t->fp8_quantize_rows_fits(&l, &a, err, kErrLen) == 0;
  if (!fits && why) *why = err;
  return fits;
}

std::pair<at::Tensor, at::Tensor> fp8_quantize_rows_kernel(const at::Tensor& x, const at::Tensor& col_scale) {
  if (!fp8_input_ok(x)) throw std::invalid_argument("fp8 quantize_rows: x must be a 2-D float32 or bf16 tensor with contiguous rows");
  int64_t rows = x.size(0), n = x.size(1);
  at::Tensor c;
  if (col_scale.defined()) {
    if (col_scale.numel() != n) throw std::invalid_argument("fp8 quantize_rows: the column factor must have one value per column of x");
    c = col_scale.to(x.device(), at::kFloat).contiguous().view({n});
    // The kernel reads it in 16-byte vectors: a view starting mid-vector gets its own copy.
    if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  }
  auto q = at::empty({rows, n}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  auto a = fp8_args(x);
  a.col_scale = c.defined() ? c.data_ptr<float>() : nullptr;
  a.q = static_cast<uint8_t*>(q.data_ptr());
  a.scale = scale.data_ptr<float>();
  auto l = launch_of(x);
  char err[kErrLen] = {0};
  KernelRecord record("ftx::kernel::fp8_quantize_rows", {x, c}, {q, scale});
  check_kernel(table().fp8_quantize_rows(&l, &a, err, kErrLen), "fp8 quantize_rows", err);
  return {q, scale};
}
}  // namespace ftx

extern "C" {
// Registers (or, with null, withdraws) the kernel table. The table must outlive every call.
void ftx_kernels_register(const FtxKernelTable* t) { g_table.store(t, std::memory_order_release); }

// libtorch's current stream on CUDA device `device` (a cudaStream_t), or null on error.
void* ftx_cuda_current_stream(int32_t device) {
  try {
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    return impl.getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device))).native_handle();
  } catch (...) {
    return nullptr;
  }
}

// RMSNorm as one autograd node: with `r`, {sum = x + r, y = norm(sum)}; else y = norm(x) (and
// *sum stays null). New tensors through `sum` and `y`. 0 on success, else -1 with `err`.
int32_t ftx_rms_norm(const at::Tensor* x, const at::Tensor* r, const at::Tensor* w, double eps, double offset, at::Tensor** sum, at::Tensor** y,
                     char* err, int32_t err_len) {
  try {
    if (r == nullptr) {
      *sum = nullptr;
      *y = new at::Tensor(RmsNormNode::apply(*x, *w, eps, offset)[1]);
    } else {
      auto out = AddRmsNormNode::apply(*x, *r, *w, eps, offset);
      *sum = new at::Tensor(out[0]);
      *y = new at::Tensor(out[1]);
    }
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}

// RMSNorm of x passing x on (RmsNormNode's first output): new tensors through `pass` (x, as a
// view) and `y`.
int32_t ftx_rms_norm_pass(const at::Tensor* x, const at::Tensor* w, double eps, double offset, at::Tensor** pass, at::Tensor** y, char* err,
                          int32_t err_len) {
  try {
    auto out = RmsNormNode::apply(*x, *w, eps, offset);
    *pass = new at::Tensor(out[0]);
    *y = new at::Tensor(out[1]);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}

// Rotary embedding of q and k ([B, T, heads, head_dim]) with cos, sin ([B, T, rot]) as one
// autograd node: new contiguous tensors through `q_out` and `k_out`.
int32_t ftx_rope(const at::Tensor* q, const at::Tensor* k, const at::Tensor* cos, const at::Tensor* sin, at::Tensor** q_out, at::Tensor** k_out,
                 char* err, int32_t err_len) {
  try {
    auto out = RopeNode::apply(*q, *k, *cos, *sin);
    *q_out = new at::Tensor(out[0]);
    *k_out = new at::Tensor(out[1]);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}
}

extern "C" {
// Rowwise e4m3 quantisation of the 2-D `x` with the column factor `col_scale` (null: none), the
// way `path` says: 0 ftx::fp8::quantize_rows (the kernel where it fits, else libtorch's
// composition), 1 the composition (quantize_rows_reference), 2 the kernel table (the CUDA kernel,
// or the CPU reference on host tensors). New tensors through `q` (e4m3) and `scale` ([rows, 1]).
// 0 on success, else -1 with `err`. What the bench and the tests compare.
int32_t ftx_fp8_quantize_rows(const at::Tensor* x, const at::Tensor* col_scale, int32_t path, at::Tensor** q, at::Tensor** scale, char* err,
                              int32_t err_len) {
  try {
    at::Tensor c = col_scale ? *col_scale : at::Tensor();
    std::pair<at::Tensor, at::Tensor> out;
    switch (path) {
      case 0: out = ftx::fp8::quantize_rows(*x, c); break;
      case 1: out = ftx::fp8::quantize_rows_reference(*x, c); break;
      case 2: out = ftx::fp8_quantize_rows_kernel(*x, c); break;
      default: throw std::invalid_argument("fp8 quantize_rows: unknown path " + std::to_string(path));
    }
    *q = new at::Tensor(out.first);
    *scale = new at::Tensor(out.second);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}

// 1 when the quantisation kernel takes `x` (ftx::fp8_quantize_kernel_fits), else 0 with why not
// in `err`.
int32_t ftx_fp8_quantize_kernel_fits(const at::Tensor* x, char* err, int32_t err_len) {
  try {
    std::string why;
    if (ftx::fp8_quantize_kernel_fits(*x, &why)) return 1;
    write_error(err, err_len, why.c_str());
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 0;
  }
}
}
