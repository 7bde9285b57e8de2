// Row-parallel GEMM + reduce-scatter: gemm_rs (FP) and gemm_rs_w8a8.
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

at::Tensor gemm_rs(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const GroupPtr& group, int64_t threshold,
                   bool enabled) {
  constexpr const char* kOp = "gemm_rs";
  ops::check_row_parallel(kOp, x, weight, bias, /*w8a8=*/false);
  const int64_t n = x.size(0), N = weight.size(0), tp = group->getSize();
  const Strategy s =
      ops::decide_strategy(OpId::kGemmRs, n, x.size(1), N, tp, x.scalar_type(), threshold, enabled);
  // The bias joins rank 0's partial before the reduction: once per row, and
  // correct whether every rank passes it or only rank 0 does (vLLM's convention).
  const at::Tensor* row_bias = (bias.has_value() && group->getRank() == 0) ? &*bias : nullptr;
  const at::Tensor w_t = weight.t();
  auto gemm = [&](int64_t row_begin, int64_t rows, at::Tensor& out) {
    const at::Tensor xs = x.narrow(0, row_begin, rows);
    if (row_bias != nullptr) {
      at::addmm_out(out, *row_bias, xs, w_t);
    } else {
      at::mm_out(out, xs, w_t);
    }
  };
  return ops::gemm_reduce_scatter(kOp, group, s, n, N, x.options(), gemm);
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
  const int64_t n = x.size(0), N = weight.size(0), tp = group->getSize();
  const Strategy s =
      ops::decide_strategy(OpId::kGemmRsW8A8, n, x.size(1), N, tp, at::kChar, threshold, enabled);
  const ops::QuantizedActivation qx = ops::quantize_activation(x, input_scale, input_zero_point);
  const at::Tensor zp_corr = input_zero_point.has_value()
                                 ? ops::zero_point_correction(weight, *input_zero_point)
                                 : at::Tensor();
  const at::Tensor* row_bias = (bias.has_value() && group->getRank() == 0) ? &*bias : nullptr;
  auto gemm = [&](int64_t row_begin, int64_t rows, at::Tensor& out) {
    const at::Tensor acc = ops::int8_matmul(qx.q.narrow(0, row_begin, rows), weight);
    const at::Tensor xs = qx.per_token() ? qx.scale.narrow(0, row_begin, rows) : qx.scale;
    ops::dequantize_into(acc, xs, weight_scale, zp_corr, row_bias, out);
  };
  return ops::gemm_reduce_scatter(kOp, group, s, n, N, x.options().dtype(out_dtype), gemm);
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
