// The core's policy (mode, strategy, owned rows, chunk plan) exposed as ops, so Python,
// tests and benchmarks ask the library instead of restating its rules.
#include "core/policy.h"
#include "core/shard.h"
#include "ops/ops.h"

namespace flashcomm {
namespace ops {

namespace {
void check_tp(const char* op, int64_t n, int64_t tp) {
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  TORCH_CHECK(tp >= 1, op, ": tp must be >= 1, got ", tp);
}
}  // namespace

std::string sp_mode_op(int64_t n, int64_t tp, int64_t sp_threshold, bool enabled) {
  check_tp("sp_mode", n, tp);
  return core::mode_name(core::choose_mode(n, tp, sp_threshold, enabled));
}

std::string strategy_op(int64_t n, int64_t tp, int64_t threshold, bool enabled) {
  check_tp("strategy", n, tp);
  TORCH_CHECK(threshold >= 0, "strategy: threshold must be resolved (>= 0), got ", threshold,
              "; see resolve_threshold");
  return core::strategy_name(core::choose_strategy(n, tp, threshold, enabled));
}

int64_t resolve_threshold_op(const std::string& op, int64_t k, int64_t n, int64_t tp,
                             const std::string& dtype, int64_t threshold) {
  return core::resolve_threshold(threshold, core::ShapeKey{op, k, n, tp, dtype});
}

std::vector<int64_t> owned_rows_op(int64_t n, int64_t tp, int64_t rank) {
  check_tp("owned_rows", n, tp);
  TORCH_CHECK(rank >= 0 && rank < tp, "owned_rows: rank must be in [0, ", tp, "), got ", rank);
  const core::RowRange r = core::owned_rows(n, tp, rank);
  return {r.begin, r.end};
}

int64_t shard_rows_op(int64_t n, int64_t tp) {
  check_tp("shard_rows", n, tp);
  return core::shard_rows(n, tp);
}

std::vector<int64_t> plan_chunks_op(int64_t c, int64_t max_chunks, int64_t min_chunk_rows) {
  TORCH_CHECK(c >= 0 && max_chunks >= 1 && min_chunk_rows >= 1,
              "plan_chunks: need c >= 0, max_chunks >= 1, min_chunk_rows >= 1; got c=", c,
              ", max_chunks=", max_chunks, ", min_chunk_rows=", min_chunk_rows);
  std::vector<int64_t> flat;
  for (const core::RowRange& r : core::plan_chunks(c, max_chunks, min_chunk_rows)) {
    flat.push_back(r.begin);
    flat.push_back(r.end);
  }
  return flat;
}

}  // namespace ops
}  // namespace flashcomm
