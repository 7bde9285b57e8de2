// Row-parallel GEMM + reduce-scatter: gemm_rs (FP) and gemm_rs_w8a8.
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

at::Tensor gemm_rs(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const GroupPtr& group, int64_t threshold,
                   bool enabled) {
  constexpr const char* kOp = "gemm_rs";
  ops::check_row_parallel(kOp, x, weight, bias, /*w8a8=*/false);
  ops::ensure_agreement(kOp, group, x.device(), {{"threshold", threshold}, {"enabled", enabled}});
  const int64_t tp = group->getSize();
  const Strategy s = ops::decide_strategy(OpId::kGemmRs, x.size(0), x.size(1), weight.size(0), tp,
                                          x.scalar_type(), threshold, enabled);
  // The bias joins rank 0's partial before the reduction: once per row, and
  // correct whether every rank passes it or only rank 0 does (vLLM's convention).
  const ops::RowLinear linear = ops::fp_row_linear(x, weight, bias, group->getRank() == 0);
  return ops::gemm_reduce_scatter(kOp, group, s, linear);
}

at::Tensor gemm_rs_w8a8(const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& weight_scale,
                        const std::optional<at::Tensor>& input_scale,
                        const std::optional<at::Tensor>& input_zero_point,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        c10::ScalarType out_dtype, int64_t threshold, bool enabled) {
  constexpr const char* kOp = "gemm_rs_w8a8";
  ops::check_row_parallel(kOp, x, weight, bias, /*w8a8=*/true);
  ops::check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  ops::ensure_agreement(kOp, group, x.device(), {{"threshold", threshold}, {"enabled", enabled}});
  const int64_t tp = group->getSize();
  const Strategy s = ops::decide_strategy(OpId::kGemmRsW8A8, x.size(0), x.size(1), weight.size(0),
                                          tp, at::kChar, threshold, enabled);
  const ops::RowLinear linear =
      ops::w8a8_row_linear(x, weight, weight_scale, input_scale, input_zero_point, bias,
                           group->getRank() == 0, out_dtype);
  return ops::gemm_reduce_scatter(kOp, group, s, linear);
}

namespace ops {

at::Tensor gemm_rs_op(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::string& group_name,
                      int64_t threshold, bool enabled) {
  return flashcomm::gemm_rs(x, weight, bias, comm::resolve_group(group_name, "gemm_rs"), threshold,
                            enabled);
}

at::Tensor gemm_rs_meta(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const std::string& group_name,
                        int64_t /*threshold*/, bool /*enabled*/) {
  const int64_t tp = comm::resolve_group(group_name, "gemm_rs")->getSize();
  check_row_parallel("gemm_rs", x, weight, bias, /*w8a8=*/false);
  // [ceil(n / tp), N] whatever the strategy; tp == 1 gives [n, N].
  return at::empty_symint({sym_ceil_div(x.sym_size(0), tp), weight.sym_size(0)}, x.options());
}

at::Tensor gemm_rs_w8a8_op(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& weight_scale,
                           const std::optional<at::Tensor>& input_scale,
                           const std::optional<at::Tensor>& input_zero_point,
                           const std::optional<at::Tensor>& bias, const std::string& group_name,
                           c10::ScalarType out_dtype, int64_t threshold, bool enabled) {
  return flashcomm::gemm_rs_w8a8(x, weight, weight_scale, input_scale, input_zero_point, bias,
                                 comm::resolve_group(group_name, "gemm_rs_w8a8"), out_dtype,
                                 threshold, enabled);
}

at::Tensor gemm_rs_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& input_scale,
                             const std::optional<at::Tensor>& input_zero_point,
                             const std::optional<at::Tensor>& bias, const std::string& group_name,
                             c10::ScalarType out_dtype, int64_t /*threshold*/, bool /*enabled*/) {
  constexpr const char* kOp = "gemm_rs_w8a8";
  const int64_t tp = comm::resolve_group(group_name, kOp)->getSize();
  check_row_parallel(kOp, x, weight, bias, /*w8a8=*/true);
  check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  return at::empty_symint({sym_ceil_div(x.sym_size(0), tp), weight.sym_size(0)},
                          x.options().dtype(out_dtype));
}

}  // namespace ops
}  // namespace flashcomm
