// One AdamW update of a flat fp32 buffer through libtorch's fused multi-tensor kernel
// (`_fused_adamw_`, what `torch.optim.AdamW(fused=True)` runs): one pass over the value, the
// two moments and the gradient instead of the dozen elementwise passes of the update written
// out op by op. Called from Rust (src/train/optim.rs) on tch's tensors (at::Tensor*).
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>

extern "C" {
// `value` (fp32) is updated in place from `grad` (any float dtype, first converted to fp32 and
// multiplied by `grad_scale`, the clipping coefficient), at optimizer step `step` (1-based,
// for the bias corrections). 0 on success, else -1 with the message in `err`.
int32_t ftx_fused_adamw(at::Tensor* value, const at::Tensor* grad, at::Tensor* exp_avg, at::Tensor* exp_avg_sq,
                        double grad_scale, double lr, double beta1, double beta2, double eps, double weight_decay,
                        int64_t step, char* err, int32_t err_len) {
  try {
    c10::InferenceMode no_grad;
    // A copy in fp32 (also when the gradient already is fp32: the kernel must not see the
    // caller's gradient scaled in place).
    auto g = grad->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    if (grad_scale != 1.0) g.mul_(grad_scale);
    auto steps = at::full({}, static_cast<double>(step), value->options().dtype(at::kFloat));
    at::_fused_adamw_({*value}, {g}, {*exp_avg}, {*exp_avg_sq}, {}, {steps}, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
    return 0;
  } catch (const std::exception& e) {
    if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return -1;
  }
}
}
