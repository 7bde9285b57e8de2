#include "ops/linear.h"

#include "ops/quant.h"
#include "ops/weights.h"

namespace flashcomm::ops {

namespace {

// The fp32 bias the dequantisation adds, or undefined.
at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}

}  // namespace

RowLinear fp_row_linear(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, bool add_bias) {
  std::optional<at::Tensor> row_bias = add_bias ? bias : std::nullopt;
  // Every block reads rows of x against the whole weight (plain or packed once).
  RowGemm gemm = [x, weight, row_bias](int64_t row_begin, int64_t rows, at::Tensor& out) {
    fp_linear_into(x.narrow(0, row_begin, rows), weight, row_bias, out);
  };
  return {std::move(gemm), x.size(0), weight.size(0), x.options()};
}

RowLinear w8a8_row_linear(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& weight_scale,
                          const std::optional<at::Tensor>& input_scale,
                          const std::optional<at::Tensor>& input_zero_point,
                          const std::optional<at::Tensor>& bias, bool add_bias,
                          c10::ScalarType out_dtype) {
  // Each block quantises its own rows when the engine asks for it (every row
  // exactly once), multiplies them, and dequantises into the given `out`.
  const ActivationQuantizer quantizer(x, input_scale, input_zero_point);
  const at::Tensor zp_corr = input_zero_point.has_value()
                                 ? zero_point_correction(weight, *input_zero_point)
                                 : at::Tensor();
  const at::Tensor row_bias = add_bias ? float_bias(bias) : at::Tensor();
  RowGemm gemm = [quantizer, weight, weight_scale, zp_corr, row_bias](
                     int64_t row_begin, int64_t rows, at::Tensor& out) {
    const QuantizedActivation qx = quantizer.quantize(row_begin, rows);
    const at::Tensor acc = int8_matmul(qx.q, weight);
    dequantize_into(acc, qx.scale, weight_scale, zp_corr,
                    row_bias.defined() ? &row_bias : nullptr, out);
  };
  return {std::move(gemm), x.size(0), weight.size(0), x.options().dtype(out_dtype)};
}

ColumnLinear fp_column_linear(const at::Tensor& x_rows, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  GatheredGemm gemm = [weight, bias](const at::Tensor& rows, at::Tensor& out) {
    fp_linear_into(rows, weight, bias, out);
  };
  ColumnLinear linear;
  linear.rows = x_rows.size(0);
  linear.payload_cols = x_rows.size(1);
  linear.payload_dtype = x_rows.scalar_type();
  linear.payload = x_rows;
  linear.write_payload = [x_rows](int64_t row_begin, int64_t rows, at::Tensor& dst) {
    dst.copy_(x_rows.narrow(0, row_begin, rows));
  };
  linear.gemm = std::move(gemm);
  linear.out_features = weight.size(0);
  linear.out_options = x_rows.options();
  return linear;
}

ColumnLinear w8a8_column_linear(const at::Tensor& x_rows, const at::Tensor& weight,
                                const at::Tensor& weight_scale,
                                const std::optional<at::Tensor>& input_scale,
                                const std::optional<at::Tensor>& input_zero_point,
                                const std::optional<at::Tensor>& bias, c10::ScalarType out_dtype) {
  // The wire carries int8 values, and for per-token scales the 4 scale bytes in
  // the same rows. Floating-point rows are quantised by write_payload, straight
  // into whatever buffer the transport hands it; int8 x with one scale travels
  // as it is.
  const ActivationQuantizer quantizer(x_rows, input_scale, input_zero_point);
  const at::Tensor zp_corr = input_zero_point.has_value()
                                 ? zero_point_correction(weight, *input_zero_point)
                                 : at::Tensor();
  const at::Tensor bias_f32 = float_bias(bias);
  const int64_t K = x_rows.size(1);
  const bool per_token = quantizer.per_token();
  const at::Tensor tensor_scale = quantizer.tensor_scale();
  GatheredGemm gemm = [=](const at::Tensor& rows, at::Tensor& out) {
    // rows [m, payload_cols]: K int8 values (+ the scale's 4 bytes per token).
    const at::Tensor acc = int8_matmul(rows.narrow(1, 0, K), weight);
    const at::Tensor x_scale = per_token ? rows.narrow(1, K, 4) : tensor_scale;
    dequantize_into(acc, x_scale, weight_scale, zp_corr,
                    bias_f32.defined() ? &bias_f32 : nullptr, out);
  };
  ColumnLinear linear;
  linear.rows = quantizer.rows();
  linear.payload_cols = quantizer.payload_cols();
  linear.payload_dtype = at::kChar;
  if (quantizer.passes_through()) linear.payload = quantizer.x();
  linear.write_payload = [quantizer](int64_t row_begin, int64_t rows, at::Tensor& dst) {
    quantizer.write_payload(row_begin, rows, dst);
  };
  linear.gemm = std::move(gemm);
  linear.out_features = weight.size(0);
  linear.out_options = x_rows.options().dtype(out_dtype);
  return linear;
}

at::Tensor materialize_payload(const ColumnLinear& linear) {
  if (linear.payload.defined() && linear.payload.is_contiguous()) return linear.payload;
  at::Tensor buf = at::empty({linear.rows, linear.payload_cols},
                             linear.out_options.dtype(linear.payload_dtype));
  if (linear.rows > 0) linear.write_payload(0, linear.rows, buf);
  return buf;
}

at::Tensor run_local(const ColumnLinear& linear) {
  at::Tensor out = at::empty({linear.rows, linear.out_features}, linear.out_options);
  if (out.size(0) > 0) linear.gemm(materialize_payload(linear), out);
  return out;
}

}  // namespace flashcomm::ops
