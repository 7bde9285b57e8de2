// Counters and process-wide configuration, as C++ API and ops.
#include <flashcomm/flashcomm.h>
#include <flashcomm/version.h>

#include "comm/comm.h"
#include "comm/shm_transport.h"
#include "core/policy.h"
#include "core/shard.h"
#include "core/stats.h"
#include "ops/ops.h"

namespace flashcomm {

std::vector<std::pair<std::string, int64_t>> stats() { return core::Stats::instance().snapshot(); }

void reset_stats() { core::Stats::instance().reset(); }

void set_pipeline_config(int64_t max_chunks, int64_t min_chunk_rows) {
  TORCH_CHECK(max_chunks >= 1, "set_pipeline_config: max_chunks must be >= 1, got ", max_chunks);
  TORCH_CHECK(min_chunk_rows >= 1, "set_pipeline_config: min_chunk_rows must be >= 1, got ",
              min_chunk_rows);
  core::set_pipeline_config({max_chunks, min_chunk_rows});
}

void set_all_reduce_provider(const std::string& group_name, const std::string& op,
                             const std::string& provider_group) {
  comm::set_all_reduce_provider(group_name, op, provider_group);
}

void clear_all_reduce_provider(const std::string& group_name) {
  comm::clear_all_reduce_provider(group_name);
}

void init(const GroupPtr& group, const at::Device& device,
          const std::vector<std::pair<std::string, int64_t>>& settings) {
  std::vector<core::Setting> named;
  for (const auto& [name, value] : settings) named.push_back({name, value});
  comm::verify(comm::resolve(group, "flashcomm.init"), "flashcomm.init", device, named);
}

void set_transport(const GroupPtr& group, const std::string& transport) {
  const comm::Group g = comm::resolve(group, "set_transport");
  comm::set_transport(g.name(), comm::parse_transport_kind(transport, "set_transport: transport"));
}

namespace ops {

std::tuple<std::vector<std::string>, std::vector<int64_t>> stats_op() {
  std::vector<std::string> names;
  std::vector<int64_t> counts;
  for (auto& [name, count] : flashcomm::stats()) {
    names.push_back(name);
    counts.push_back(count);
  }
  return {names, counts};
}

std::vector<int64_t> get_pipeline_config_op() {
  const core::PipelineConfig cfg = core::pipeline_config();
  return {cfg.max_chunks, cfg.min_chunk_rows};
}

void set_auto_threshold_op(const std::string& op, int64_t k, int64_t n, int64_t tp,
                           const std::string& dtype, int64_t threshold) {
  TORCH_CHECK(threshold >= 0, "set_auto_threshold: threshold must be >= 0, got ", threshold);
  core::ThresholdTable::instance().set({op, k, n, tp, dtype}, threshold);
}

void clear_auto_thresholds_op() { core::ThresholdTable::instance().clear(); }

void verify_agreement_op(const std::string& group_name, const std::vector<std::string>& names,
                         const std::vector<int64_t>& values, const c10::Device& device) {
  TORCH_CHECK(names.size() == values.size(), "verify_agreement: names (", names.size(),
              ") and values (", values.size(), ") must have the same length");
  std::vector<core::Setting> settings;
  for (size_t i = 0; i < names.size(); ++i) settings.push_back({names[i], values[i]});
  comm::verify(comm::resolve(group_name, "flashcomm.init"), "flashcomm.init", device, settings);
}

void set_transport_op(const std::string& group_name, const std::string& transport) {
  comm::set_transport(group_name,
                      comm::parse_transport_kind(transport, "set_transport: transport"));
}

std::string transport_op(const std::string& group_name) {
  return comm::transport_name(group_name);
}

std::string all_reduce_provider_op(const std::string& group_name) {
  return comm::all_reduce_provider(group_name);
}

void set_capturing_for_testing_op(bool capturing) {
  comm::set_capturing_for_testing(capturing);
}

std::string version_op() { return kVersion; }

std::tuple<std::vector<std::string>, std::vector<int64_t>> defaults_op() {
  return {{"threshold", "sp_threshold", "max_chunks", "min_chunk_rows", "shm_bytes"},
          {kDefaultThreshold, kDefaultSpThreshold, kDefaultMaxChunks, kDefaultMinChunkRows,
           comm::kDefaultShmBytes}};
}

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
