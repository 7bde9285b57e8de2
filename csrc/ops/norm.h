// Add + RMSNorm on a block of token rows (the boundary norm of the
// layout-invariant ops; csrc/ops/sp_ops.cpp decides which rows).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace flashcomm::ops {

// vLLM's fused add + RMSNorm convention on the rows given (x, residual, normed
// and residual_out are [m, H] with the same m, any row stride; weight [H], any
// floating dtype, used rounded to x's dtype; normed and residual_out have x's
// dtype and device, and overlap neither each other nor, unless they are the
// very same memory (in place), the inputs):
//   s            = x + residual, in fp32 (s = x without residual)
//   residual_out = s rounded to x's dtype
//   normed       = (s * rsqrt(mean(s^2) + eps)) rounded to x's dtype, times weight
// The arguments are those check_norm accepted.
void add_rms_norm_rows(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const at::Tensor& weight, double eps, const at::Tensor& normed,
                       const at::Tensor& residual_out);

}  // namespace flashcomm::ops
