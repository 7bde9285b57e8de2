#include "core/agreement.h"

#include <sstream>

#include "core/policy.h"

namespace flashcomm::core {

int64_t stable_hash(const std::string& text) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : text) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return static_cast<int64_t>(h >> 1);
}

std::vector<Setting> global_settings() {
  const PipelineConfig cfg = pipeline_config();
  return {
      {"library version (" + std::string(kVersion) + ")", stable_hash(kVersion)},
      {"pipeline max_chunks", cfg.max_chunks},
      {"pipeline min_chunk_rows", cfg.min_chunk_rows},
      {"bitwise modes FLASHCOMM_BITWISE_MODES", bitwise_modes() ? 1 : 0},
      {"tuning table (hash of its entries)", stable_hash(ThresholdTable::instance().describe())},
  };
}

std::string describe_disagreement(const std::vector<Setting>& settings,
                                  const std::vector<int64_t>& values_by_rank, int64_t world) {
  const size_t count = settings.size();
  std::ostringstream msg;
  for (size_t s = 0; s < count; ++s) {
    bool same = true;
    for (int64_t r = 1; r < world; ++r) {
      same = same && values_by_rank[r * count + s] == values_by_rank[s];
    }
    if (same) continue;
    msg << (msg.tellp() > 0 ? "; " : "") << "'" << settings[s].name << "':";
    for (int64_t r = 0; r < world; ++r) {
      msg << (r ? "," : "") << " rank " << r << " = " << values_by_rank[r * count + s];
    }
  }
  return msg.str();
}

}  // namespace flashcomm::core
