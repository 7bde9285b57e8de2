// The engines shared by the FP and W8A8 ops: a row- or column-parallel linear
// (ops/linear.h) driven through the group's transport (comm/transport.h). The
// engines own the layout, the padding, the chunking and the collectives, so both
// strategies and both transports produce the same layout.
//
// Chunking. A rank block of c rows is cut into chunks (the strategy: one chunk
// when sequential, core::plan_chunks when pipelined), and each chunk into steps
// that fit the transport's step capacity. Every quantity comes from rank-invariant
// values (n, tp, shapes, the agreed pipeline config and shared-memory budget), so
// every rank issues the same steps in the same order.
#pragma once

#include <ATen/ATen.h>

#include "comm/comm.h"
#include "core/policy.h"
#include "core/stats.h"
#include "ops/linear.h"

namespace flashcomm::ops {

// The strategy of one call (threshold < 0 resolved through the tuning table for
// the op shape), recorded in the per-op counters. Rank-invariant inputs only.
// `record` = false: only the decision (the replicated path of bitwise mode
// invariance reproduces the sharded path's chunking without counting a call of it).
core::Strategy decide_strategy(core::OpId op, const comm::Group& group, int64_t n_global,
                               int64_t K, int64_t N, c10::ScalarType dtype, int64_t threshold,
                               bool enabled, bool record = true);

// Row-parallel GEMM + reduce-scatter over n global rows into `out` ([c, N],
// contiguous: this rank's block of the summed product, rows >= n zero; a group
// that does not communicate: [n, N]). Each step's partial product is written by
// the GEMM straight into the transport's send buffer (shm: this rank's slot).
void gemm_reduce_scatter(const comm::Group& group, core::Strategy strategy,
                         const RowLinear& linear, at::Tensor out, const comm::CallInfo& call);

// Row-parallel GEMM + all-reduce into `out` ([n, N], contiguous): every row valid
// on every rank. `out` may be the memory the GEMM reads (an in-place all-reduce of
// an engine's partial product): every step copies its rows out before they are summed.
void gemm_all_reduce(const comm::Group& group, const RowLinear& linear, at::Tensor out,
                     const comm::CallInfo& call);

// All-gather of this rank's [c, P] payload block (linear.rows == c) + GEMM.
// Returns [n, N] with the padding rows dropped; the GEMM reads every rank's rows
// where the transport delivers them (shm: straight from the peers' slots).
// `out`, when defined ([n, N], contiguous), receives the result instead of a new tensor.
at::Tensor all_gather_gemm(const comm::Group& group, core::Strategy strategy, int64_t n,
                           const ColumnLinear& linear, const comm::CallInfo& call,
                           at::Tensor out = at::Tensor());

// True when gemm_reduce_scatter(group, strategy, ...) and gemm_all_reduce(group, ...)
// of n rows of N outputs (`element_size` bytes each) both compute their GEMM as one
// call over rows [0, n): the same rows in the same call, so the same bits.
bool row_gemm_in_one_call(const comm::Group& group, core::Strategy strategy, int64_t n, int64_t N,
                          int64_t element_size, const char* op);

// The local GEMM of every row (replicated mode) computed over exactly the blocks of
// rows all_gather_gemm(group, strategy, n, ...) would give the GEMM, so each row's
// output is bitwise the sharded path's (a GEMM's rows may depend on how many rows
// it gets). `linear` holds all n rows (linear.rows == n). No communication.
at::Tensor local_gemm_as_gathered(const comm::Group& group, core::Strategy strategy, int64_t n,
                                  const ColumnLinear& linear);

// [n, N_r] on every rank -> [n, N_r * tp], output features in rank order.
at::Tensor gather_output_features(const comm::Group& group, const at::Tensor& local,
                                  const comm::CallInfo& call);

// t [n, H] (contiguous) with this rank's owned rows valid -> every row valid, in
// place: each rank's owned rows travel (shm: through its slot) into the others' t.
void gather_owned_rows(const comm::Group& group, at::Tensor t, const comm::CallInfo& call);

}  // namespace flashcomm::ops
