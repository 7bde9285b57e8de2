// Builders of the per-rank GEMM of a row- or column-parallel linear, FP or
// W8A8, so that both op families (compact and layout-invariant) drive it through
// the same engines (csrc/ops/pipeline.h) or run it locally.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "ops/pipeline.h"

namespace flashcomm::ops {

RowLinear fp_row_linear(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, bool add_bias);

RowLinear w8a8_row_linear(const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& weight_scale,
                          const std::optional<at::Tensor>& input_scale,
                          const std::optional<at::Tensor>& input_zero_point,
                          const std::optional<at::Tensor>& bias, bool add_bias,
                          c10::ScalarType out_dtype);

// x_rows [rows, K]: the token rows this rank contributes (all rows when run
// locally). bias [N_r] is this rank's slice, added on every rank.
ColumnLinear fp_column_linear(const at::Tensor& x_rows, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias);

ColumnLinear w8a8_column_linear(const at::Tensor& x_rows, const at::Tensor& weight,
                                const at::Tensor& weight_scale,
                                const std::optional<at::Tensor>& input_scale,
                                const std::optional<at::Tensor>& input_zero_point,
                                const std::optional<at::Tensor>& bias, c10::ScalarType out_dtype);

// The column product of all payload rows, locally (no communication): [rows, N_r].
at::Tensor run_local(const ColumnLinear& linear);

}  // namespace flashcomm::ops
