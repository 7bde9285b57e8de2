// All-gather + column-parallel GEMM: ag_gemm (FP) and ag_gemm_w8a8.
#include <flashcomm/flashcomm.h>

#include "comm/comm.h"
#include "core/policy.h"
#include "core/stats.h"
#include "ops/agreement.h"
#include "ops/checks.h"
#include "ops/linear.h"
#include "ops/ops.h"
#include "ops/pipeline.h"

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
  ops::ensure_agreement(kOp, group, x.device(), {{"threshold", threshold}, {"enabled", enabled}});
  const Strategy s = ops::decide_strategy(OpId::kAgGemm, num_tokens, x.size(1), weight.size(0), tp,
                                          x.scalar_type(), threshold, enabled);
  const at::Tensor local =
      ops::all_gather_gemm(kOp, group, s, num_tokens, ops::fp_column_linear(x, weight, bias));
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
  ops::ensure_agreement(kOp, group, x.device(), {{"threshold", threshold}, {"enabled", enabled}});
  const Strategy s = ops::decide_strategy(OpId::kAgGemmW8A8, num_tokens, x.size(1), weight.size(0),
                                          tp, at::kChar, threshold, enabled);
  const ops::ColumnLinear linear = ops::w8a8_column_linear(x, weight, weight_scale, input_scale,
                                                           input_zero_point, bias, out_dtype);
  const at::Tensor local = ops::all_gather_gemm(kOp, group, s, num_tokens, linear);
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
