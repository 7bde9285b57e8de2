// Counters, process-wide settings (pipeline, thresholds, transports, all-reduce
// providers) and the agreement step, as C++ API and ops.
#include <flashcomm/flashcomm.h>
#include <flashcomm/version.h>

#include "comm/comm.h"
#include "comm/shm_transport.h"
#include "core/policy.h"
#include "core/stats.h"
#include "kernels/cpu/isa.h"
#include "ops/ops.h"

#include <stdexcept>

namespace flashcomm {

std::vector<std::pair<std::string, int64_t>> stats() { return core::Stats::instance().snapshot(); }

void reset_stats() { core::Stats::instance().reset(); }

void set_pipeline_config(int64_t max_chunks, int64_t min_chunk_rows) {
  TORCH_CHECK(max_chunks >= 1, "set_pipeline_config: max_chunks must be >= 1, got ", max_chunks);
  TORCH_CHECK(min_chunk_rows >= 1, "set_pipeline_config: min_chunk_rows must be >= 1, got ",
              min_chunk_rows);
  core::set_pipeline_config({max_chunks, min_chunk_rows});
}

void set_bitwise_modes(bool on) { core::set_bitwise_modes(on); }

bool bitwise_modes() {
  try {
    return core::bitwise_modes();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
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

void all_reduce_for_testing_op(const at::Tensor& t, const std::string& group_name) {
  constexpr const char* kOp = "flashcomm_testing::all_reduce";
  TORCH_CHECK(t.is_contiguous(), kOp, ": t must be contiguous");
  const comm::Group g = comm::resolve(group_name, kOp);
  comm::ensure_ready(g, kOp, t.device(), {});
  if (!g.collective()) return;
  at::Tensor inout = t;
  comm::CallInfo call;
  call.op = kOp;
  g.transport().all_reduce(inout, call);
}

std::string version_op() { return kVersion; }

std::string cpu_features_op() {
  using kernels::CpuExt;
  std::string out = kernels::isa_name(kernels::cpu_isa());
  for (CpuExt ext : {CpuExt::kAvxVnni, CpuExt::kAvx512Vnni, CpuExt::kAvx512Bf16,
                     CpuExt::kAmxInt8, CpuExt::kAmxBf16}) {
    if (kernels::cpu_has(ext)) out += std::string(" ") + kernels::cpu_ext_name(ext);
  }
  return out;
}

std::tuple<std::vector<std::string>, std::vector<int64_t>> defaults_op() {
  return {{"threshold", "sp_threshold", "max_chunks", "min_chunk_rows", "shm_bytes"},
          {kDefaultThreshold, kDefaultSpThreshold, kDefaultMaxChunks, kDefaultMinChunkRows,
           comm::kDefaultShmBytes}};
}

}  // namespace ops
}  // namespace flashcomm
