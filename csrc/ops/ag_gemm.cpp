// All-gather + column-parallel GEMM: ag_gemm (FP) and ag_gemm_w8a8.
#include <flashcomm/flashcomm.h>

#include "comm/comm.h"
#include "core/policy.h"
#include "core/stats.h"
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

// [num_tokens, N_r] (or [num_tokens, N_r * tp]) whatever the strategy.
at::Tensor gather_linear(const char* op, OpId id, const comm::Group& g, int64_t num_tokens,
                         const ops::ColumnLinear& linear, int64_t K, c10::ScalarType key_dtype,
                         int64_t threshold, bool enabled, bool gather_output) {
  const Strategy s = ops::decide_strategy(id, g, num_tokens, K, linear.out_features, key_dtype,
                                          threshold, enabled);
  const comm::CallInfo call{op, num_tokens, -1, static_cast<int8_t>(s)};
  const at::Tensor local = ops::all_gather_gemm(g, s, num_tokens, linear, call);
  return gather_output ? ops::gather_output_features(g, local, call) : local;
}

}  // namespace

at::Tensor ag_gemm(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const GroupPtr& group, int64_t num_tokens,
                   int64_t threshold, bool enabled, bool gather_output) {
  constexpr const char* kOp = "ag_gemm";
  const comm::Group g = comm::resolve(group, kOp);
  ops::check_column_parallel(kOp, x, weight, bias, num_tokens, g.size(), /*w8a8=*/false);
  comm::ensure_ready(g, kOp, x.device(), {{"threshold", threshold}, {"enabled", enabled}});
  return gather_linear(kOp, OpId::kAgGemm, g, num_tokens, ops::fp_column_linear(x, weight, bias),
                       x.size(1), x.scalar_type(), threshold, enabled, gather_output);
}

at::Tensor ag_gemm_w8a8(const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& weight_scale,
                        const std::optional<at::Tensor>& input_scale,
                        const std::optional<at::Tensor>& input_zero_point,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        int64_t num_tokens, c10::ScalarType out_dtype, int64_t threshold,
                        bool enabled, bool gather_output) {
  constexpr const char* kOp = "ag_gemm_w8a8";
  const comm::Group g = comm::resolve(group, kOp);
  ops::check_column_parallel(kOp, x, weight, bias, num_tokens, g.size(), /*w8a8=*/true);
  ops::check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  comm::ensure_ready(g, kOp, x.device(), {{"threshold", threshold}, {"enabled", enabled}});
  return gather_linear(kOp, OpId::kAgGemmW8A8, g, num_tokens,
                       ops::w8a8_column_linear(x, weight, weight_scale, input_scale,
                                               input_zero_point, bias, out_dtype),
                       x.size(1), at::kChar, threshold, enabled, gather_output);
}

namespace ops {

at::Tensor ag_gemm_meta(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        c10::SymInt num_tokens, int64_t /*threshold*/, bool /*enabled*/,
                        bool gather_output) {
  const int64_t tp = group->getSize();
  check_column_parallel("ag_gemm", x, weight, bias, num_tokens, tp, /*w8a8=*/false);
  // [num_tokens, N_r] (or [num_tokens, N_r * tp]) whatever the strategy.
  return at::empty_symint({num_tokens, out_features(weight, tp, gather_output)}, x.options());
}

at::Tensor ag_gemm_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& input_scale,
                             const std::optional<at::Tensor>& input_zero_point,
                             const std::optional<at::Tensor>& bias, const GroupPtr& group,
                             c10::SymInt num_tokens, c10::ScalarType out_dtype,
                             int64_t /*threshold*/, bool /*enabled*/, bool gather_output) {
  constexpr const char* kOp = "ag_gemm_w8a8";
  const int64_t tp = group->getSize();
  check_column_parallel(kOp, x, weight, bias, num_tokens, tp, /*w8a8=*/true);
  check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  return at::empty_symint({num_tokens, out_features(weight, tp, gather_output)},
                          x.options().dtype(out_dtype));
}

}  // namespace ops
}  // namespace flashcomm
