// W8A8 primitives on ATen (device-generic). Conventions (DESIGN.md section 5):
//   static:   q = clamp(round(x / s) + zp, -128, 127),  x ~= s * (q - zp)
//   dynamic:  s_t = max|x_t| / 127 per token row, q = round(x / s_t) in [-127, 127];
//             an all-zero row gets s_t = 0 and q = 0 (dequantises to 0, never NaN)
//   GEMM:     acc = q @ W^T in int32 (exact for K <= kMaxInt8K)
//   dequant:  y = (acc - zp * rowsum(W)) * s_x * s_w  (+ bias) in fp32
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace flashcomm::ops {

// Activation quantised for the int8 GEMM. `scale` is [1] (per-tensor) or
// [rows, 1] (per-token), float32.
struct QuantizedActivation {
  at::Tensor q;      // int8 [rows, K]
  at::Tensor scale;  // float32 [1] or [rows, 1]
  bool per_token() const { return scale.dim() == 2; }
};

// Quantises (or, for int8 x, passes through) x according to the op's inputs.
QuantizedActivation quantize_activation(const at::Tensor& x,
                                        const std::optional<at::Tensor>& input_scale,
                                        const std::optional<at::Tensor>& input_zero_point);

// int8 [m, K] x int8 [N, K] -> int32 [m, N], exact.
at::Tensor int8_matmul(const at::Tensor& a, const at::Tensor& weight);

// Per-output-channel sum of an int8 weight [N, K] as float32 [N], scaled by
// the zero point: the asymmetric correction term zp * sum_k W[n, k].
at::Tensor zero_point_correction(const at::Tensor& weight, const at::Tensor& zero_point);

// Dequantises an int32 accumulator block and writes it into `out` (any float
// dtype): out = ((acc - zp_corr) * x_scale * w_scale + bias).
//   x_scale  [1] or [m, 1]; w_scale [1], [N] or [N, 1]; zp_corr [N] or undefined;
//   bias [N] or nullptr.
void dequantize_into(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                     const at::Tensor& zp_corr, const at::Tensor* bias, at::Tensor& out);

// Packs per-token scales into the int8 payload so one all-gather moves both:
// [rows, K] int8 + [rows, 1] float32 -> [rows, K + 4] int8.
at::Tensor pack_rows_with_scales(const at::Tensor& q, const at::Tensor& scale);
// Inverse of pack_rows_with_scales for K columns of values.
QuantizedActivation unpack_rows_with_scales(const at::Tensor& packed, int64_t K);

}  // namespace flashcomm::ops
