// Causal scaled-dot-product attention as one autograd node whose backward runs over slices of
// the key/value heads (with their query heads), so that the backward's transient buffers are
// one slice's instead of every head's. Flash attention's backward over all heads holds, beside
// dq/dk/dv, an fp32 accumulator for dq and (with grouped-query attention) k/v gradients
// expanded to every query head: for llama-3.1-8b at 96k tokens ~40 KB a token, 3.7 GiB, the
// largest transient of a long-context layer. Attention is independent per head, so each
// slice's gradient is the gradient of its own heads: the same values.
//
// The forward pass is libtorch's SDPA over all heads (the same kernel and output as without the
// node) and keeps only q, k and v (not the output, which the output projection keeps anyway).
// The backward recomputes each slice's output with autograd (one more attention forward pass,
// the cost of the memory) and back-propagates the slice of the output's gradient into slices of
// preallocated dq, dk, dv. Called from Rust (src/model/nodes.rs) on tch's tensors (at::Tensor*).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// Causal SDPA of q [B, H, T, D] over k, v [B, KVH, T, D] (grouped when H > KVH).
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<double> scale) {
  bool gqa = q.size(1) != k.size(1);
  return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, true, scale, gqa);
}

struct SlicedSdpa : public torch::autograd::Function<SlicedSdpa> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool has_scale, int64_t kv_per_slice) {
    ctx->save_for_backward({q, k, v});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_scale"] = has_scale;
    ctx->saved_data["kv_per_slice"] = kv_per_slice;
    return attend(q, k, v, has_scale ? std::optional<double>(scale) : std::nullopt);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2];
    const auto& dout = grads[0];
    if (!dout.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    std::optional<double> scale;
    if (ctx->saved_data["has_scale"].toBool()) scale = ctx->saved_data["scale"].toDouble();
    int64_t kv_heads = k.size(1), group = q.size(1) / kv_heads;
    int64_t per = std::max<int64_t>(1, ctx->saved_data["kv_per_slice"].toInt());
    // Laid out as q, k, v are (a [B, T, H, D] memory under the [B, H, T, D] view), so the
    // gradients flow on into the rotary embedding and the projections without a copy.
    auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    for (int64_t s = 0; s < kv_heads; s += per) {
      int64_t n = std::min(per, kv_heads - s);
      auto qs = q.narrow(1, s * group, n * group).detach().requires_grad_(true);
      auto ks = k.narrow(1, s, n).detach().requires_grad_(true);
      auto vs = v.narrow(1, s, n).detach().requires_grad_(true);
      at::Tensor out;
      {
        at::AutoGradMode on(true);
        out = attend(qs, ks, vs, scale);
      }
      auto g = torch::autograd::grad({out}, {qs, ks, vs}, {dout.narrow(1, s * group, n * group)});
      dq.narrow(1, s * group, n * group).copy_(g[0]);
      dk.narrow(1, s, n).copy_(g[1]);
      dv.narrow(1, s, n).copy_(g[2]);
    }
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void write_error(char* err, int32_t len, const char* what) {
  if (err && len > 0) std::snprintf(err, static_cast<size_t>(len), "%s", what);
}

}  // namespace

extern "C" {
// Causal SDPA of q [B, H, T, D] over k, v [B, KVH, T, D] (scale: `has_scale` != 0 for
// `scale`, else head_dim^-½), its backward in slices of `kv_per_slice` key/value heads. The
// output is returned through `out` (owned by the caller, as tch's). 0 on success, else -1 with
// the message in `err`.
int32_t ftx_sliced_sdpa(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, double scale, int32_t has_scale, int64_t kv_per_slice, at::Tensor** out, char* err, int32_t err_len) {
  try {
    *out = new at::Tensor(SlicedSdpa::apply(*q, *k, *v, scale, has_scale != 0, kv_per_slice));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}
}
