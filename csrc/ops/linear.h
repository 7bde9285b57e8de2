// Builders of the per-rank GEMM of a row- or column-parallel linear, FP or
// W8A8, so that both op families (compact and layout-invariant) drive it through
// the same engines (csrc/ops/pipeline.h) or run it locally.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <functional>
#include <optional>


namespace flashcomm::ops {

// Rows [begin, begin + count) of t: t itself when that is every row. At decode sizes a
// dispatched view (narrow -> slice -> as_strided) costs as much as a small kernel.
inline at::Tensor row_range(const at::Tensor& t, int64_t begin, int64_t count) {
  return begin == 0 && count == t.size(0) ? t : t.narrow(0, begin, count);
}

// dst.copy_(src) for equally shaped tensors; a plain memcpy (no dispatch, no iterator)
// when both are contiguous CPU tensors of one dtype.
inline void copy_rows(at::Tensor& dst, const at::Tensor& src) {
  if (dst.device().is_cpu() && src.device().is_cpu() && dst.scalar_type() == src.scalar_type() &&
      dst.is_contiguous() && src.is_contiguous() && dst.sizes() == src.sizes()) {
    if (src.numel() > 0) {
      std::memcpy(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size());
    }
  } else {
    dst.copy_(src);
  }
}

// Writes the partial product of global token rows [row_begin, row_begin + rows)
// into `out` ([rows, N], row-contiguous, the linear's output dtype). `out` may be
// a view of shared memory (the host transport's slot): write into it, don't
// replace it.
using RowGemm = std::function<void(int64_t row_begin, int64_t rows, at::Tensor& out)>;

// Writes the product of gathered payload rows `rows` ([m, payload_cols]: rows the
// op all-gathered, possibly a view of a peer's shared-memory slot: read-only)
// into `out` ([m, N], row-contiguous).
using GatheredGemm = std::function<void(const at::Tensor& rows, at::Tensor& out)>;

// Writes payload rows [row_begin, row_begin + rows) of this rank into `dst`
// ([rows, payload_cols] of payload_dtype, row-contiguous, possibly shared memory).
using PayloadWriter = std::function<void(int64_t row_begin, int64_t rows, at::Tensor& dst)>;

// Row-parallel partial product over n token rows: x [n, K_r] @ W [N, K_r]^T,
// bias added only where `add_bias` (rank 0), so it lands once per row after the
// sum over ranks.
struct RowLinear {
  RowGemm gemm;
  int64_t n = 0;
  int64_t out_features = 0;
  at::TensorOptions out_options;
};

// Column-parallel product of token rows. The payload is this rank's rows in the
// form that travels: [rows, K] values (FP), or for W8A8 int8 values with the
// per-token fp32 scale packed into 4 trailing bytes of each row. `gemm` turns any
// gathered block of payload rows into output rows.
struct ColumnLinear {
  int64_t rows = 0;              // payload rows this rank contributes
  int64_t payload_cols = 0;      // elements per payload row
  c10::ScalarType payload_dtype = c10::kFloat;
  at::Tensor payload;            // [rows, payload_cols] when it already exists as a tensor
                                 // (FP: x's rows), so a transport may send it in place;
                                 // undefined when it is only produced by write_payload
  PayloadWriter write_payload;   // always set
  GatheredGemm gemm;
  int64_t out_features = 0;
  at::TensorOptions out_options;
};

// The whole payload as one contiguous tensor: `payload` when defined and
// contiguous, else written into a new one.
at::Tensor materialize_payload(const ColumnLinear& linear);

// The builders take the op's `weight` as it came: plain [N, K] on any device, or
// packed once by the prepare step (ops/weights.h). Every GEMM call, whatever
// block of rows it gets, reads the whole weight as it is (rows of x are sliced,
// never W), so a packed weight is reused by every block of every strategy.
// W8A8 blocks quantise their rows when the engine asks for them (RowGemm: inside
// the call; ColumnLinear: in write_payload, straight into the given buffer) and
// dequantise into the given `out` (ops/quant.h).

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
