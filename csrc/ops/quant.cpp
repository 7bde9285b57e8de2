#include "ops/quant.h"

namespace flashcomm::ops {

namespace {

// `v` already rounded. NaN has no int8 value: it maps to 0 (for dynamic
// quantisation its row keeps a NaN scale, so the NaN still reaches the output).
at::Tensor saturate_to_int8(const at::Tensor& v, double lo, double hi) {
  return at::clamp(at::nan_to_num(v, 0.0, hi, lo), lo, hi).to(at::kChar);
}

}  // namespace

QuantizedActivation quantize_activation(const at::Tensor& x,
                                        const std::optional<at::Tensor>& input_scale,
                                        const std::optional<at::Tensor>& input_zero_point) {
  if (x.scalar_type() == at::kChar) {
    const at::Tensor& s = *input_scale;
    return {x, s.dim() == 2 ? s : s.reshape({1})};
  }
  at::Tensor xf = x.to(at::kFloat);
  if (input_scale.has_value()) {
    at::Tensor s = input_scale->reshape({1});
    at::Tensor v = at::round(xf / s);  // round half to even, then shift by the zero point
    if (input_zero_point.has_value()) v = v + input_zero_point->reshape({1}).to(at::kFloat);
    return {saturate_to_int8(v, -128.0, 127.0), s};
  }
  at::Tensor absmax = xf.abs().amax(/*dim=*/1, /*keepdim=*/true);  // [rows, 1]
  if (xf.size(0) > 0) {
    // amax drops NaN on some backends; make a row containing NaN keep a NaN scale.
    absmax = at::where(xf.isnan().any(1, true), at::full_like(absmax, NAN), absmax);
  }
  at::Tensor scale = absmax / 127.0;
  at::Tensor safe = at::where(scale == 0, at::ones_like(scale), scale);
  return {saturate_to_int8(at::round(xf / safe), -127.0, 127.0), scale};
}

at::Tensor int8_matmul(const at::Tensor& a, const at::Tensor& weight) {
  const int64_t m = a.size(0), K = a.size(1), N = weight.size(0);
  if (m == 0 || N == 0) return at::zeros({m, N}, a.options().dtype(at::kInt));
  if (K == 0) return at::zeros({m, N}, a.options().dtype(at::kInt));
  // CPU _int_mm returns garbage for K == 1 (torch 2.13); CUDA's has shape limits.
  const bool int_mm_ok = (a.device().is_cpu() && K > 1) ||
                         (a.device().is_cuda() && m > 16 && K % 8 == 0 && N % 8 == 0);
  if (int_mm_ok) return at::_int_mm(a.contiguous(), weight.t());
  // Exact fallback: every partial sum of int8 products is an integer below
  // 2^31 < 2^53, so float64 accumulation is exact.
  return at::mm(a.to(at::kDouble), weight.to(at::kDouble).t()).to(at::kInt);
}

at::Tensor zero_point_correction(const at::Tensor& weight, const at::Tensor& zero_point) {
  return weight.sum(/*dim=*/1, /*keepdim=*/false, at::kInt).to(at::kFloat) *
         zero_point.reshape({1}).to(at::kFloat);
}

void dequantize_into(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                     const at::Tensor& zp_corr, const at::Tensor* bias, at::Tensor& out) {
  at::Tensor y = acc.to(at::kFloat);
  if (zp_corr.defined()) y.sub_(zp_corr);
  y.mul_(x_scale);                   // [1] or [m, 1] broadcasts over columns
  y.mul_(w_scale.reshape({1, -1}));  // [1, 1] or [1, N] broadcasts over rows
  if (bias != nullptr) y.add_(bias->to(at::kFloat));
  out.copy_(y);
}

at::Tensor pack_rows_with_scales(const at::Tensor& q, const at::Tensor& scale) {
  // Flatten first: a [rows, 1] tensor may carry any stride in its size-1 dim.
  at::Tensor scale_bytes = scale.reshape({-1}).contiguous().view(at::kChar).view({-1, 4});
  return at::cat({q, scale_bytes}, /*dim=*/1);
}

QuantizedActivation unpack_rows_with_scales(const at::Tensor& packed, int64_t K) {
  at::Tensor q = packed.narrow(1, 0, K);
  // A fresh copy: a one-row slice is already "contiguous" but starts at byte K,
  // which a float view needs to be 4-aligned.
  at::Tensor scale = packed.narrow(1, K, 4).clone(at::MemoryFormat::Contiguous).view(at::kFloat);
  if (packed.size(0) == 0) scale = scale.reshape({0, 1});
  return {q, scale};
}

}  // namespace flashcomm::ops
