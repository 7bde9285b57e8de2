// Argument validation shared by the real kernels and the Meta kernels, so an
// invalid call fails the same way eagerly and while torch.compile traces.
// Sizes are read as SymInts: concrete for real tensors, symbolic under tracing
// (a symbolic equality becomes a deferred runtime assert, not a guard).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <optional>

namespace flashcomm::ops {

// Largest K for which an int8 x int8 dot product cannot overflow int32:
// K * 128 * 128 <= 2^31 - 1.
inline constexpr int64_t kMaxInt8K = 131071;

// Short dtype name used in tuning-table keys ("float32", "bfloat16", ...).
const char* dtype_key(c10::ScalarType t);

c10::SymInt sym_ceil_div(const c10::SymInt& a, int64_t b);

// Any linear: x `x_layout`, weight `w_layout` with equal K, bias [weight.size(0)].
void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, bool w8a8, const char* x_layout,
                  const char* w_layout);

// gemm_rs / gemm_rs_w8a8: x [n, K], weight [N, K], bias [N]. `w8a8` selects the
// dtype rules of the quantised op.
void check_row_parallel(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, bool w8a8);

// ag_gemm / ag_gemm_w8a8: x [c, K] with c == ceil(num_tokens / tp), weight
// [N_r, K], bias [N_r].
void check_column_parallel(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const c10::SymInt& num_tokens,
                           int64_t tp, bool w8a8);

// W8A8 scales. `rows` is the number of local token rows of x (n for gemm_rs,
// c for ag_gemm), allowed as the length of a per-token input_scale of int8 x.
void check_w8a8_scales(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& weight_scale, const std::optional<at::Tensor>& input_scale,
                       const std::optional<at::Tensor>& input_zero_point,
                       c10::ScalarType out_dtype);

// sp_reduce / sp_gather: `arg` [n, N] floating point.
void check_partial(const char* op, const at::Tensor& partial, const char* arg = "partial");

// sp_reduce_ / sp_gather_: `arg` [n, N] floating point, contiguous (written in place).
void check_partial_inplace(const char* op, const at::Tensor& partial,
                           const char* arg = "partial");

// sp_add_rms_norm_: x and residual [n, H], same dtype and device, contiguous, not
// overlapping (normed and residual_out are written into them); weight [H].
void check_norm_inplace(const char* op, const at::Tensor& x, const at::Tensor& residual,
                        const at::Tensor& weight);

// sp_add_rms_norm: x [n, H] floating point, residual (optional) like x, weight [H].
void check_norm(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                const at::Tensor& weight);

}  // namespace flashcomm::ops
