// Fused residual add + RMSNorm over a block of token rows (the boundary norm of
// the layout-invariant ops). Multi-ISA, see isa.h.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "kernels/cpu/isa.h"

namespace flashcomm::kernels {

// A block of `rows` rows of `hidden` elements, all of `dtype`. Every row is
// contiguous (element stride 1); rows are `*_row_stride` elements apart, so the
// block may be a narrow of a wider [n, H] tensor or of a padded buffer.
struct AddRmsNormArgs {
  const void* x;             // [rows, hidden]
  int64_t x_row_stride;
  const void* residual;      // [rows, hidden], or nullptr: s = x
  int64_t residual_row_stride;
  const void* weight;        // [hidden], contiguous, `dtype`
  void* normed;              // [rows, hidden]
  int64_t normed_row_stride;
  void* residual_out;        // [rows, hidden]
  int64_t residual_out_row_stride;
  int64_t rows;
  int64_t hidden;
  float eps;
  c10::ScalarType dtype;     // float32, bfloat16 or float16
};

// Per row, with s = x + residual computed in fp32 and never rounded before use:
//   residual_out = s rounded to dtype
//   inv_rms      = 1 / sqrt(sum(s^2) / hidden + eps)               (fp32)
//   normed       = (s * inv_rms) * weight                           (fp32)
//   normed       = round(float(round(s * inv_rms)) * float(weight)) (16-bit dtypes)
// i.e. what ATen gives for `(s * inv_rms).to(dtype) * weight`, up to the
// summation order of sum(s^2). A NaN/Inf in s propagates as in that expression.
// An output may be the very same memory as an input (in place: each element is
// read before it is written); otherwise outputs overlap neither the inputs nor
// each other.
// Parallel over rows with at::parallel_for. The AVX512 copy converts bf16 with
// the AVX512-BF16 instructions where the CPU has them (bitwise the same
// results); ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 makes it use AVX512 alone
// (kernels::cpu_has).
using AddRmsNormFn = void(const AddRmsNormArgs& args);
extern KernelTable<AddRmsNormFn> add_rms_norm_kernel;

// True for the dtypes add_rms_norm_kernel handles.
inline bool add_rms_norm_supports(c10::ScalarType dtype) {
  return dtype == c10::kFloat || dtype == c10::kBFloat16 || dtype == c10::kHalf;
}

}  // namespace flashcomm::kernels
