// W8A8 activation quantisation and dequantisation over blocks of token rows,
// one pass per row. Multi-ISA, see isa.h. The numerics are those of
// csrc/ops/quant.h, element for element (same fp32 operations in the same
// order), so every ISA variant gives bitwise the same int8 values, scales and
// outputs as the ATen composition it replaces.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "kernels/cpu/isa.h"

namespace flashcomm::kernels {

// `rows` rows of K floating-point values (`dtype`: float32, bfloat16 or
// float16); each row is contiguous and rows are `row_stride` elements apart.
struct FloatRows {
  const void* data;
  int64_t row_stride;
  c10::ScalarType dtype;
};

// Destination of quantised rows: row i's K int8 values at q + i * q_row_stride
// (bytes) and, for per-token quantisation, its fp32 scale as 4 bytes at
// scale + i * scale_row_stride (bytes, any alignment). The ColumnLinear payload
// row (K values, then the scale) is q_row_stride = scale_row_stride = K + 4,
// scale = q + K.
struct Int8Rows {
  int8_t* q;
  int64_t q_row_stride;
  char* scale;
  int64_t scale_row_stride;
};

// Dynamic per-token symmetric: per row, absmax = max |x| (NaN if the row holds a
// NaN), s = absmax / 127, q = clamp(round_half_even(x / (s == 0 ? 1 : s)), -127,
// 127) with NaN -> 0. Writes q and s. Parallel over rows.
using QuantizeDynamicFn = void(const FloatRows& x, int64_t rows, int64_t K, const Int8Rows& dst);
extern KernelTable<QuantizeDynamicFn> quantize_dynamic_kernel;

// Static per-tensor: q = clamp(round_half_even(x / scale) + zero_point, -128, 127)
// with NaN -> 0 (the sum in fp32). Writes q only. Parallel over rows.
using QuantizeStaticFn = void(const FloatRows& x, int64_t rows, int64_t K, float scale,
                              int32_t zero_point, const Int8Rows& dst);
extern KernelTable<QuantizeStaticFn> quantize_static_kernel;

// A block of `rows` x N accumulators and where their dequantised values go.
struct DequantArgs {
  const void* acc;             // [rows, N]: int32 exact products, or float32 holding
                               // float(int32 product) (what a GEMM with unit scales gives)
  c10::ScalarType acc_dtype;   // kInt or kFloat
  int64_t acc_row_stride;      // elements
  const char* x_scale;         // fp32 scale of row i at x_scale + i * x_scale_row_stride
  int64_t x_scale_row_stride;  // bytes; 0 = one per-tensor scale
  const float* w_scale;        // [N] per channel, or [1] per tensor
  bool w_scale_per_channel;
  const float* zp_correction;  // [N]: zp * sum_k W[n, k], or nullptr
  const float* bias;           // [N] fp32, or nullptr
  void* out;                   // [rows, N] of out_dtype
  c10::ScalarType out_dtype;   // float32, bfloat16 or float16
  int64_t out_row_stride;      // elements
};

// out = round_to_out_dtype(((float(acc) - zp_correction) * x_scale) * w_scale + bias),
// each operation rounded to fp32 in that order (no fused multiply-add). Parallel
// over rows.
using DequantizeFn = void(const DequantArgs& args, int64_t rows, int64_t N);
extern KernelTable<DequantizeFn> dequantize_kernel;

// True for the activation / output dtypes the kernels above handle.
inline bool quant_supports(c10::ScalarType dtype) {
  return dtype == c10::kFloat || dtype == c10::kBFloat16 || dtype == c10::kHalf;
}

}  // namespace flashcomm::kernels
