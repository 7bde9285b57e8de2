// Row-parallel GEMM + reduce-scatter: gemm_rs (FP) and gemm_rs_w8a8.
#include <flashcomm/flashcomm.h>

#include "comm/comm.h"
#include "core/policy.h"
#include "core/shard.h"
#include "core/stats.h"
#include "ops/checks.h"
#include "ops/linear.h"
#include "ops/ops.h"
#include "ops/pipeline.h"

namespace flashcomm {

using core::OpId;
using core::Strategy;

namespace {

// [ceil(n / tp), N] whatever the strategy (tp == 1: [n, N]).
at::Tensor reduce_scatter_linear(const char* op, OpId id, const comm::Group& g,
                                 const ops::RowLinear& linear, int64_t K,
                                 c10::ScalarType key_dtype, int64_t threshold, bool enabled) {
  const int64_t n = linear.n;
  const Strategy s = ops::decide_strategy(id, g, n, K, linear.out_features, key_dtype, threshold,
                                          enabled);
  at::Tensor out =
      at::empty({core::shard_rows(n, g.size()), linear.out_features}, linear.out_options);
  ops::gemm_reduce_scatter(g, s, linear, out, {op, n, -1, static_cast<int8_t>(s)});
  return out;
}

}  // namespace

at::Tensor gemm_rs(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const GroupPtr& group, int64_t threshold,
                   bool enabled) {
  constexpr const char* kOp = "gemm_rs";
  ops::check_row_parallel(kOp, x, weight, bias, /*w8a8=*/false);
  const comm::Group g = comm::resolve(group, kOp);
  comm::ensure_ready(g, kOp, x.device(), {{"threshold", threshold}, {"enabled", enabled}});
  // The bias joins rank 0's partial before the reduction: once per row, and
  // correct whether every rank passes it or only rank 0 does (vLLM's convention).
  return reduce_scatter_linear(kOp, OpId::kGemmRs, g,
                               ops::fp_row_linear(x, weight, bias, g.rank() == 0), x.size(1),
                               x.scalar_type(), threshold, enabled);
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
  const comm::Group g = comm::resolve(group, kOp);
  comm::ensure_ready(g, kOp, x.device(), {{"threshold", threshold}, {"enabled", enabled}});
  return reduce_scatter_linear(
      kOp, OpId::kGemmRsW8A8, g,
      ops::w8a8_row_linear(x, weight, weight_scale, input_scale, input_zero_point, bias,
                           g.rank() == 0, out_dtype),
      x.size(1), at::kChar, threshold, enabled);
}

namespace ops {

at::Tensor gemm_rs_meta(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        int64_t /*threshold*/, bool /*enabled*/) {
  check_row_parallel("gemm_rs", x, weight, bias, /*w8a8=*/false);
  // [ceil(n / tp), N] whatever the strategy; tp == 1 gives [n, N].
  return at::empty_symint({sym_ceil_div(x.sym_size(0), group->getSize()), weight.sym_size(0)},
                          x.options());
}

at::Tensor gemm_rs_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& weight_scale,
                             const std::optional<at::Tensor>& input_scale,
                             const std::optional<at::Tensor>& input_zero_point,
                             const std::optional<at::Tensor>& bias, const GroupPtr& group,
                             c10::ScalarType out_dtype, int64_t /*threshold*/, bool /*enabled*/) {
  constexpr const char* kOp = "gemm_rs_w8a8";
  check_row_parallel(kOp, x, weight, bias, /*w8a8=*/true);
  check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  return at::empty_symint({sym_ceil_div(x.sym_size(0), group->getSize()), weight.sym_size(0)},
                          x.options().dtype(out_dtype));
}

}  // namespace ops
}  // namespace flashcomm
