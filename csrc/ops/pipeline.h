// The two kernel strategies shared by the FP and W8A8 ops. An op supplies a
// row-GEMM callback; these engines own the layout, the padding and the
// collectives, so sequential and pipelined produce the same layout.
#pragma once

#include <ATen/ATen.h>

#include "comm/comm.h"
#include "core/policy.h"
#include "core/stats.h"
#include "ops/linear.h"

namespace flashcomm::ops {

// The strategy of one call (threshold < 0 resolved through the tuning table
// for the op shape), recorded in the per-op counters. Rank-invariant inputs only.
core::Strategy decide_strategy(core::OpId op, int64_t n_global, int64_t K, int64_t N, int64_t tp,
                               c10::ScalarType dtype, int64_t threshold, bool enabled);

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
