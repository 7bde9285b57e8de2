// W8A8 primitives. Conventions (docs/DESIGN.md section 6), the numerics contract of
// every device and kernel:
//   static:   q = clamp(round_half_even(x / s) + zp, -128, 127) (the sum in fp32),
//             x ~= s * (q - zp); NaN -> 0, +-Inf and out-of-range values saturate
//   dynamic:  s_t = max|x_t| / 127 per token row (fp32), q = round_half_even(x / s_t)
//             in [-127, 127]; an all-zero row (or one whose scale underflows to 0)
//             gets s_t = 0 and q = 0 (dequantises to 0, never NaN); a row holding
//             NaN or +-Inf gets a NaN / Inf scale and q = 0, so its output is NaN
//   GEMM:     acc = q @ W^T in int32 (exact for K <= kMaxInt8K)
//   dequant:  y = (((float(acc) - zp * rowsum(W)) * s_x) * s_w) + bias, each step
//             rounded to fp32, then rounded once to the output dtype
// On CPU the quantisation and the dequantisation are single-pass kernels
// (kernels/cpu/quant.h) that write straight into the destination; other devices
// run the same arithmetic as ATen ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace flashcomm::ops {

// Activation rows quantised for the int8 GEMM. `scale` is float32 [1]
// (per-tensor) or [rows, 1] (per-token).
struct QuantizedActivation {
  at::Tensor q;      // int8 [rows, K]
  at::Tensor scale;  // float32 [1] or [rows, 1]
};

// How one op call turns its x into int8 rows, block by block (each row is
// quantised once, when its block is needed):
//   float x, no input_scale:  dynamic per-token
//   float x, input_scale [1]: static per-tensor (+ input_zero_point)
//   int8 x:                   passed through, with input_scale [1] or [rows, 1]
class ActivationQuantizer {
 public:
  ActivationQuantizer(const at::Tensor& x, const std::optional<at::Tensor>& input_scale,
                      const std::optional<at::Tensor>& input_zero_point);

  int64_t rows() const { return x_.size(0); }
  int64_t cols() const { return x_.size(1); }
  // True when every row has its own scale (dynamic, or int8 x with [rows, 1]).
  bool per_token() const { return mode_ == Mode::kDynamic || mode_ == Mode::kInt8PerToken; }
  // int8 x with one scale: x itself is the quantised activation.
  bool passes_through() const { return mode_ == Mode::kInt8PerTensor; }
  const at::Tensor& x() const { return x_; }
  // The per-tensor scale [1] (undefined when per_token()).
  const at::Tensor& tensor_scale() const { return scale_; }

  // Rows [begin, begin + count) quantised.
  QuantizedActivation quantize(int64_t begin, int64_t count) const;

  // Rows [begin, begin + count) in the ColumnLinear payload layout, written into
  // dst (int8 [count, payload_cols()], rows dst.stride(0) bytes apart): K int8
  // values, then (per_token()) the row's fp32 scale as 4 bytes.
  void write_payload(int64_t begin, int64_t count, at::Tensor& dst) const;
  int64_t payload_cols() const { return cols() + (per_token() ? 4 : 0); }

 private:
  enum class Mode { kDynamic, kStatic, kInt8PerTensor, kInt8PerToken };
  Mode mode_;
  at::Tensor x_;      // [rows, K], elements of a row contiguous
  at::Tensor scale_;  // [1] (static, int8 per-tensor) or [rows, 1] (int8 per-token)
  at::Tensor zero_point_;  // int32 [1] or undefined
  float static_scale_ = 0.0f;   // CPU static: scale_ and zero_point_ as values
  int32_t static_zero_point_ = 0;
};

// int8 [m, K] x int8 weight [N, K] (plain on any device, or packed on CPU) ->
// the exact products [m, N]: int32, or float32 holding float(int32) (packed).
at::Tensor int8_matmul(const at::Tensor& a, const at::Tensor& weight);

// zp * sum_k W[n, k] as float32 [N]: the asymmetric correction term. The row
// sums are computed once per weight (ops/weights.h).
at::Tensor zero_point_correction(const at::Tensor& weight, const at::Tensor& zero_point);

// Dequantises a block of accumulators ([m, N], int32 or float32 as int8_matmul
// returns them) and writes it into `out` ([m, N], any float dtype, written in
// place): out = ((acc - zp_corr) * x_scale) * w_scale + bias.
//   x_scale  float32 [1] or [m, 1]; or int8 [m, 4]: the raw fp32 bytes of each
//            row's scale (the trailing bytes of payload rows, any alignment);
//   w_scale  float32 [1] or [N]; zp_corr float32 [N] or undefined;
//   bias     float32 [N] or nullptr.
void dequantize_into(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                     const at::Tensor& zp_corr, const at::Tensor* bias, at::Tensor& out);

}  // namespace flashcomm::ops
