// Per-op, per-strategy call counters, so tests and users can see which kernel
// strategy actually ran (also inside compiled graphs). Torch-free, lock-free.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/policy.h"

namespace flashcomm::core {

enum class OpId : int { kGemmRs = 0, kAgGemm, kGemmRsW8A8, kAgGemmW8A8, kCount };

const char* op_name(OpId op);

class Stats {
 public:
  static Stats& instance();
  void record(OpId op, Strategy s);
  int64_t count(OpId op, Strategy s) const;
  // ("<op>.<strategy>", count) for every op and strategy, zeros included.
  std::vector<std::pair<std::string, int64_t>> snapshot() const;
  void reset();

 private:
  static constexpr int kStrategies = 2;
  std::array<std::atomic<int64_t>, static_cast<int>(OpId::kCount) * kStrategies> counts_{};
};

}  // namespace flashcomm::core
