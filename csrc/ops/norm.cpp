#include "ops/norm.h"

namespace flashcomm::ops {

// vLLM's add + RMSNorm convention, on the rows given: s = x + residual (fp32),
// residual_out = s in x's dtype, normed = (s * rsqrt(mean(s^2) + eps)) in x's
// dtype, times weight.
void add_rms_norm_rows(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const at::Tensor& weight, double eps, at::Tensor normed,
                       at::Tensor residual_out) {
  at::Tensor s = x.to(at::kFloat);
  if (residual.has_value()) s = s + residual->to(at::kFloat);
  residual_out.copy_(s);
  const at::Tensor inv_rms = at::rsqrt(s.pow(2).mean(/*dim=*/{-1}, /*keepdim=*/true) + eps);
  at::mul_out(normed, (s * inv_rms).to(x.scalar_type()), weight.to(x.scalar_type()));
}

}  // namespace flashcomm::ops
