// Linear weights as the ops receive them: plain [N, K] tensors on any device, or
// CPU weights packed by the prepare step (include/flashcomm/weights.h) into
// torch's oneDNN layout. The GEMMs of ops/linear.cpp go through these functions,
// which pick the kernel from the weight's format.
//
// Packed formats (both report the plain weight's sizes [N, K] and dtype):
//   FP:   mkldnn::_reorder_linear_weight(W), run by mkldnn::_linear_pointwise.
//   int8: onednn::qlinear_prepack(W), run by onednn::qlinear_pointwise with unit
//         scales and fp32 output, which is float(int32 product) exactly. torch
//         reports that tensor as W^T ([K, N]); prepare sets its reported sizes to
//         [N, K], and each call hands torch a shallow copy reporting [K, N].
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace flashcomm::ops {

enum class WeightFormat { kPlain, kPackedFloat, kPackedInt8 };

WeightFormat weight_format(const at::Tensor& weight);

// out [m, N] (row-contiguous, any destination, written in place) = x [m, K] @ W^T
// (+ bias [N]), for a plain or packed FP weight. x, W, bias and out share a dtype.
void fp_linear_into(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, at::Tensor& out);

// q int8 [m, K] (any row stride) x packed int8 W -> float32 [m, N] holding the
// exact int32 products as float (what at::_int_mm(q, W^T).to(float) gives).
at::Tensor packed_int8_matmul(const at::Tensor& q, const at::Tensor& weight);

// sum_k W[n, k] as float32 [N] (exact: |sum| <= 128 * K < 2^24), computed once
// per weight and cached. The cache holds a weak reference to the weight's
// TensorImpl and, for a plain weight, its version counter and data pointer: an
// in-place change or a storage swap recomputes it. Packed weights are immutable.
// Inference tensors carry no version counter, so a plain inference-mode weight is
// summed on every call.
at::Tensor weight_row_sums(const at::Tensor& weight);

// Worst-case operands of a GEMM in `dtype` as exact float64 (x [4, K], W [16, K]):
// integers using every mantissa bit of the dtype, partial sums far larger than the
// totals; for int8 the u8 255 / s8 127 / s8 -128 pairs that a 16-bit pair sum (oneDNN
// without VNNI or AMX) saturates on, at K = 4097. A GEMM path is used on this CPU only
// after it reproduced the exact product of these, rounded once to its output.
std::pair<at::Tensor, at::Tensor> worst_case_operands(c10::ScalarType dtype);

}  // namespace flashcomm::ops
