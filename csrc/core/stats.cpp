#include "core/stats.h"

namespace flashcomm::core {

const char* op_name(OpId op) {
  switch (op) {
    case OpId::kGemmRs:
      return "gemm_rs";
    case OpId::kAgGemm:
      return "ag_gemm";
    case OpId::kGemmRsW8A8:
      return "gemm_rs_w8a8";
    case OpId::kAgGemmW8A8:
      return "ag_gemm_w8a8";
    default:
      return "unknown";
  }
}

Stats& Stats::instance() {
  static Stats stats;
  return stats;
}

void Stats::record(OpId op, Strategy s) {
  counts_[static_cast<int>(op) * kStrategies + static_cast<int>(s)].fetch_add(
      1, std::memory_order_relaxed);
}

int64_t Stats::count(OpId op, Strategy s) const {
  return counts_[static_cast<int>(op) * kStrategies + static_cast<int>(s)].load(
      std::memory_order_relaxed);
}

std::vector<std::pair<std::string, int64_t>> Stats::snapshot() const {
  std::vector<std::pair<std::string, int64_t>> out;
  for (int op = 0; op < static_cast<int>(OpId::kCount); ++op) {
    for (Strategy s : {Strategy::kSequential, Strategy::kPipelined}) {
      out.emplace_back(std::string(op_name(static_cast<OpId>(op))) + "." + strategy_name(s),
                       count(static_cast<OpId>(op), s));
    }
  }
  return out;
}

void Stats::reset() {
  for (auto& c : counts_) c.store(0, std::memory_order_relaxed);
}

}  // namespace flashcomm::core
