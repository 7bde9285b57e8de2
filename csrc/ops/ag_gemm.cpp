// All-gather + column-parallel GEMM: ag_gemm (FP) and ag_gemm_w8a8.
#include <flashcomm/flashcomm.h>

#include "comm/comm.h"
#include "core/policy.h"
#include "core/stats.h"
#include "ops/checks.h"
#include "ops/ops.h"
#include "ops/pipeline.h"
#include "ops/quant.h"

namespace flashcomm {

using core::OpId;
using core::Strategy;

namespace {

c10::SymInt out_features(const at::Tensor& weight, int64_t tp, bool gather_output) {
  return gather_output ? weight.sym_size(0) * tp : weight.sym_size(0);
}

}  // namespace

at::Tensor ag_gemm(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const GroupPtr& group, int64_t num_tokens,
                   int64_t threshold, bool enabled, bool gather_output) {
  constexpr const char* kOp = "ag_gemm";
  const int64_t tp = group->getSize();
  ops::check_column_parallel(kOp, x, weight, bias, num_tokens, tp, /*w8a8=*/false);
  const int64_t N_r = weight.size(0);
  const Strategy s = ops::decide_strategy(OpId::kAgGemm, num_tokens, x.size(1), N_r, tp,
                                          x.scalar_type(), threshold, enabled);
  const at::Tensor w_t = weight.t();
  // Column-parallel: each rank owns its bias slice, so every rank adds it.
  auto gemm = [&](const at::Tensor& rows, at::Tensor& out) {
    if (bias.has_value()) {
      at::addmm_out(out, *bias, rows, w_t);
    } else {
      at::mm_out(out, rows, w_t);
    }
  };
  at::Tensor local = ops::all_gather_gemm(kOp, group, s, num_tokens, N_r, x, x.options(), gemm);
  return gather_output ? ops::gather_output_features(kOp, group, local) : local;
}

at::Tensor ag_gemm_w8a8(const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& weight_scale,
                        const std::optional<at::Tensor>& input_scale,
                        const std::optional<at::Tensor>& input_zero_point,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        int64_t num_tokens, c10::ScalarType out_dtype, int64_t threshold,
                        bool enabled, bool gather_output) {
  constexpr const char* kOp = "ag_gemm_w8a8";
  const int64_t tp = group->getSize();
  ops::check_column_parallel(kOp, x, weight, bias, num_tokens, tp, /*w8a8=*/true);
  ops::check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  const int64_t K = x.size(1), N_r = weight.size(0);
  const Strategy s = ops::decide_strategy(OpId::kAgGemmW8A8, num_tokens, K, N_r, tp, at::kChar,
                                          threshold, enabled);
  // Quantise only this rank's shard; the wire carries int8 values, and for
  // per-token scales the 4 scale bytes ride in the same rows.
  const ops::QuantizedActivation qx = ops::quantize_activation(x, input_scale, input_zero_point);
  const at::Tensor payload = qx.per_token() ? ops::pack_rows_with_scales(qx.q, qx.scale) : qx.q;
  const at::Tensor zp_corr = input_zero_point.has_value()
                                 ? ops::zero_point_correction(weight, *input_zero_point)
                                 : at::Tensor();
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  auto gemm = [&](const at::Tensor& rows, at::Tensor& out) {
    const ops::QuantizedActivation part = qx.per_token() ? ops::unpack_rows_with_scales(rows, K)
                                                         : ops::QuantizedActivation{rows, qx.scale};
    const at::Tensor acc = ops::int8_matmul(part.q, weight);
    ops::dequantize_into(acc, part.scale, weight_scale, zp_corr, b, out);
  };
  at::Tensor local = ops::all_gather_gemm(kOp, group, s, num_tokens, N_r, payload,
                                          x.options().dtype(out_dtype), gemm);
  return gather_output ? ops::gather_output_features(kOp, group, local) : local;
}

namespace ops {

at::Tensor ag_gemm_op(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::string& group_name,
                      int64_t num_tokens, int64_t threshold, bool enabled, bool gather_output) {
  return flashcomm::ag_gemm(x, weight, bias, comm::resolve_group(group_name, "ag_gemm"), num_tokens,
                            threshold, enabled, gather_output);
}

at::Tensor ag_gemm_meta(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const std::string& group_name,
                        c10::SymInt num_tokens, int64_t /*threshold*/, bool /*enabled*/,
                        bool gather_output) {
  const int64_t tp = comm::resolve_group(group_name, "ag_gemm")->getSize();
  check_column_parallel("ag_gemm", x, weight, bias, num_tokens, tp, /*w8a8=*/false);
  // [num_tokens, N_r] (or [num_tokens, N_r * tp]) whatever the strategy.
  return at::empty_symint({num_tokens, out_features(weight, tp, gather_output)}, x.options());
}

at::Tensor ag_gemm_w8a8_op(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& weight_scale,
                           const std::optional<at::Tensor>& input_scale,
                           const std::optional<at::Tensor>& input_zero_point,
                           const std::optional<at::Tensor>& bias, const std::string& group_name,
                           int64_t num_tokens, c10::ScalarType out_dtype, int64_t threshold,
                           bool enabled, bool gather_output) {
  return flashcomm::ag_gemm_w8a8(x, weight, weight_scale, input_scale, input_zero_point, bias,
                                 comm::resolve_group(group_name, "ag_gemm_w8a8"), num_tokens,
                                 out_dtype, threshold, enabled, gather_output);
}

at::Tensor ag_gemm_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& input_scale,
                             const std::optional<at::Tensor>& input_zero_point,
                             const std::optional<at::Tensor>& bias, const std::string& group_name,
                             c10::SymInt num_tokens, c10::ScalarType out_dtype,
                             int64_t /*threshold*/, bool /*enabled*/, bool gather_output) {
  constexpr const char* kOp = "ag_gemm_w8a8";
  const int64_t tp = comm::resolve_group(group_name, kOp)->getSize();
  check_column_parallel(kOp, x, weight, bias, num_tokens, tp, /*w8a8=*/true);
  check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  return at::empty_symint({num_tokens, out_features(weight, tp, gather_output)},
                          x.options().dtype(out_dtype));
}

}  // namespace ops
}  // namespace flashcomm
