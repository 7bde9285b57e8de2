#include "ops/linear.h"

#include "ops/quant.h"

namespace flashcomm::ops {

RowLinear fp_row_linear(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, bool add_bias) {
  std::optional<at::Tensor> row_bias = add_bias ? bias : std::nullopt;
  at::Tensor w_t = weight.t();
  RowGemm gemm = [x, w_t, row_bias](int64_t row_begin, int64_t rows, at::Tensor& out) {
    const at::Tensor xs = x.narrow(0, row_begin, rows);
    if (row_bias.has_value()) {
      at::addmm_out(out, *row_bias, xs, w_t);
    } else {
      at::mm_out(out, xs, w_t);
    }
  };
  return {std::move(gemm), x.size(0), weight.size(0), x.options()};
}

RowLinear w8a8_row_linear(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& weight_scale,
                          const std::optional<at::Tensor>& input_scale,
                          const std::optional<at::Tensor>& input_zero_point,
                          const std::optional<at::Tensor>& bias, bool add_bias,
                          c10::ScalarType out_dtype) {
  QuantizedActivation qx = quantize_activation(x, input_scale, input_zero_point);
  at::Tensor zp_corr = input_zero_point.has_value()
                           ? zero_point_correction(weight, *input_zero_point)
                           : at::Tensor();
  std::optional<at::Tensor> row_bias = add_bias ? bias : std::nullopt;
  RowGemm gemm = [qx, weight, weight_scale, zp_corr, row_bias](int64_t row_begin, int64_t rows,
                                                               at::Tensor& out) {
    const at::Tensor acc = int8_matmul(qx.q.narrow(0, row_begin, rows), weight);
    const at::Tensor xs = qx.per_token() ? qx.scale.narrow(0, row_begin, rows) : qx.scale;
    dequantize_into(acc, xs, weight_scale, zp_corr, row_bias ? &*row_bias : nullptr, out);
  };
  return {std::move(gemm), x.size(0), weight.size(0), x.options().dtype(out_dtype)};
}

ColumnLinear fp_column_linear(const at::Tensor& x_rows, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  at::Tensor w_t = weight.t();
  GatheredGemm gemm = [w_t, bias](const at::Tensor& rows, at::Tensor& out) {
    if (bias.has_value()) {
      at::addmm_out(out, *bias, rows, w_t);
    } else {
      at::mm_out(out, rows, w_t);
    }
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
  // Quantise only the rows this rank contributes; the wire carries int8 values,
  // and for per-token scales the 4 scale bytes ride in the same rows.
  const QuantizedActivation qx = quantize_activation(x_rows, input_scale, input_zero_point);
  const bool per_token = qx.per_token();
  at::Tensor payload = per_token ? pack_rows_with_scales(qx.q, qx.scale) : qx.q;
  at::Tensor zp_corr = input_zero_point.has_value()
                           ? zero_point_correction(weight, *input_zero_point)
                           : at::Tensor();
  const int64_t K = x_rows.size(1);
  at::Tensor tensor_scale = per_token ? at::Tensor() : qx.scale;
  GatheredGemm gemm = [=](const at::Tensor& rows, at::Tensor& out) {
    const QuantizedActivation part =
        per_token ? unpack_rows_with_scales(rows, K) : QuantizedActivation{rows, tensor_scale};
    const at::Tensor acc = int8_matmul(part.q, weight);
    dequantize_into(acc, part.scale, weight_scale, zp_corr, bias ? &*bias : nullptr, out);
  };
  ColumnLinear linear;
  linear.rows = payload.size(0);
  linear.payload_cols = payload.size(1);
  linear.payload_dtype = payload.scalar_type();
  linear.payload = payload;
  linear.write_payload = [payload](int64_t row_begin, int64_t rows, at::Tensor& dst) {
    dst.copy_(payload.narrow(0, row_begin, rows));
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
