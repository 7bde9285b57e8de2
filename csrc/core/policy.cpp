#include "core/policy.h"

#include "core/settings.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace flashcomm::core {

const char* strategy_name(Strategy s) {
  return s == Strategy::kPipelined ? "pipelined" : "sequential";
}

Strategy choose_strategy(int64_t n_global, int64_t tp, int64_t threshold, bool enabled,
                         bool force_collectives) {
  return (enabled && (tp > 1 || force_collectives) && n_global > threshold)
             ? Strategy::kPipelined
             : Strategy::kSequential;
}

const char* mode_name(Mode m) { return m == Mode::kSharded ? "sharded" : "replicated"; }

Mode choose_mode(int64_t n, int64_t tp, int64_t sp_threshold, bool enabled,
                 bool force_collectives) {
  return (enabled && (tp > 1 || force_collectives) && n > sp_threshold) ? Mode::kSharded
                                                                       : Mode::kReplicated;
}

ThresholdTable& ThresholdTable::instance() {
  static ThresholdTable table;
  return table;
}

void ThresholdTable::set(const ShapeKey& key, int64_t threshold) {
  if (threshold < 0) throw std::invalid_argument("ThresholdTable::set: threshold must be >= 0");
  std::lock_guard<std::mutex> lock(mu_);
  table_[key] = threshold;
}

std::optional<int64_t> ThresholdTable::lookup(const ShapeKey& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = table_.find(key);
  if (it == table_.end()) return std::nullopt;
  return it->second;
}

void ThresholdTable::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  table_.clear();
}

size_t ThresholdTable::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_.size();
}

std::string ThresholdTable::describe() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string text;
  for (const auto& [key, threshold] : table_) {
    text += key.op + "/" + std::to_string(key.k) + "/" + std::to_string(key.n) + "/" +
            std::to_string(key.tp) + "/" + key.dtype + "=" + std::to_string(threshold) + ";";
  }
  return text;
}

int64_t resolve_threshold(int64_t threshold, const ShapeKey& key) {
  if (threshold >= 0) return threshold;
  return ThresholdTable::instance().lookup(key).value_or(kDefaultThreshold);
}

namespace {
std::mutex g_config_mu;
PipelineConfig g_config;
}  // namespace

PipelineConfig pipeline_config() {
  std::lock_guard<std::mutex> lock(g_config_mu);
  return g_config;
}

void set_pipeline_config(const PipelineConfig& config) {
  if (config.max_chunks < 1 || config.min_chunk_rows < 1) {
    throw std::invalid_argument("set_pipeline_config: max_chunks and min_chunk_rows must be >= 1");
  }
  std::lock_guard<std::mutex> lock(g_config_mu);
  g_config = config;
}

namespace {
// -1: not read yet (FLASHCOMM_BITWISE_MODES is read at first use), else 0 / 1.
std::atomic<int> g_bitwise_modes{-1};

int bitwise_modes_from_env() {
  return settings::env_bool("FLASHCOMM_BITWISE_MODES", kDefaultBitwiseModes) ? 1 : 0;
}
}  // namespace

bool bitwise_modes() {
  int v = g_bitwise_modes.load(std::memory_order_relaxed);
  if (v < 0) {
    v = bitwise_modes_from_env();
    int expected = -1;
    if (!g_bitwise_modes.compare_exchange_strong(expected, v)) v = expected;
  }
  return v == 1;
}

void set_bitwise_modes(bool on) { g_bitwise_modes.store(on ? 1 : 0, std::memory_order_relaxed); }

}  // namespace flashcomm::core
