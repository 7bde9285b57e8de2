// The two kernel strategies shared by the FP and W8A8 ops. An op supplies a
// row-GEMM callback; these engines own the layout, the padding and the
// collectives, so sequential and pipelined produce the same layout.
#pragma once

#include <ATen/ATen.h>

#include <functional>

#include "comm/comm.h"
#include "core/policy.h"
#include "core/stats.h"

namespace flashcomm::ops {

// The strategy of one call (threshold < 0 resolved through the tuning table
// for the op shape), recorded in the per-op counters. Rank-invariant inputs only.
core::Strategy decide_strategy(core::OpId op, int64_t n_global, int64_t K, int64_t N, int64_t tp,
                               c10::ScalarType dtype, int64_t threshold, bool enabled);

// Writes the partial product of global token rows [row_begin, row_begin + rows)
// into `out` ([rows, N], contiguous, the engine's output dtype).
using RowGemm = std::function<void(int64_t row_begin, int64_t rows, at::Tensor& out)>;

// Writes the product of gathered token rows `rows` ([m, ...]: the payload rows
// the op all-gathered) into `out` ([m, N], contiguous).
using GatheredGemm = std::function<void(const at::Tensor& rows, at::Tensor& out)>;

// Row-parallel partial product over n token rows: x [n, K_r] @ W [N, K_r]^T,
// bias added only where `add_bias` (rank 0), so it lands once per row after the
// sum over ranks.
struct RowLinear {
  RowGemm gemm;
  int64_t n = 0;
  int64_t out_features = 0;
  at::TensorOptions out_options;
};

// Column-parallel product of token rows: `payload` holds this rank's rows in
// the form that travels ([rows, K] values, for W8A8 int8 with per-token scales
// packed in), `gemm` turns any gathered block of payload rows into output rows.
struct ColumnLinear {
  at::Tensor payload;
  GatheredGemm gemm;
  int64_t out_features = 0;
  at::TensorOptions out_options;
};

// Row-parallel GEMM + reduce-scatter over n global rows. Returns this rank's
// [c, N] block of the summed product (rows >= n zero); tp == 1: [n, N].
// Sequential: one GEMM into a [tp*c, N] buffer, one reduce-scatter.
// Pipelined: per chunk of block rows, one GEMM per rank block into the chunk's
// send buffer, then an async reduce-scatter that overlaps the next chunk's GEMM.
// `out`, when defined, receives the block ([c, N], contiguous) instead of a new tensor.
at::Tensor gemm_reduce_scatter(const char* op, const comm::Group& group, core::Strategy strategy,
                               const RowLinear& linear, at::Tensor out = at::Tensor());

// Row-parallel GEMM + all-reduce: [n, N], all rows valid on every rank.
at::Tensor gemm_all_reduce(const char* op, const comm::Group& group, const RowLinear& linear);

// All-gather of this rank's [c, P] payload shard (linear.payload) + GEMM. Returns [n, N] with
// the padding rows dropped. Sequential: one all-gather, one GEMM. Pipelined:
// every chunk's all-gather is issued up front; chunk i's GEMM runs while the
// later chunks are still in flight.
at::Tensor all_gather_gemm(const char* op, const comm::Group& group, core::Strategy strategy,
                           int64_t n, const ColumnLinear& linear);

// [n, N_r] on every rank -> [n, N_r * tp], output features in rank order.
at::Tensor gather_output_features(const char* op, const comm::Group& group,
                                  const at::Tensor& local);

}  // namespace flashcomm::ops
