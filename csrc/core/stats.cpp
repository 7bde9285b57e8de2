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
    case OpId::kSpRowLinear:
      return "sp_row_linear";
    case OpId::kSpColumnLinear:
      return "sp_column_linear";
    case OpId::kSpRowLinearW8A8:
      return "sp_row_linear_w8a8";
    case OpId::kSpColumnLinearW8A8:
      return "sp_column_linear_w8a8";
    case OpId::kSpAddRmsNorm:
      return "sp_add_rms_norm";
    case OpId::kSpReduce:
      return "sp_reduce";
    case OpId::kSpGather:
      return "sp_gather";
    default:
      return "unknown";
  }
}

const char* transport_path_name(TransportPath p) {
  switch (p) {
    case TransportPath::kAllReduceOneShot:
      return "shm_all_reduce.one_shot";
    case TransportPath::kAllReduceTwoShot:
      return "shm_all_reduce.two_shot";
    case TransportPath::kReduceInline:
      return "shm_reduce.inline";
    case TransportPath::kReduceOverlapped:
      return "shm_reduce.overlapped";
    default:
      return "unknown.unknown";
  }
}

bool is_layout_invariant(OpId op) {
  return static_cast<int>(op) >= static_cast<int>(OpId::kSpRowLinear);
}

Stats& Stats::instance() {
  static Stats stats;
  return stats;
}

std::atomic<int64_t>& Stats::slot(OpId op, int path) {
  return counts_[static_cast<int>(op) * kPaths + path];
}

const std::atomic<int64_t>& Stats::slot(OpId op, int path) const {
  return counts_[static_cast<int>(op) * kPaths + path];
}

void Stats::record(OpId op, Strategy s) {
  slot(op, static_cast<int>(s)).fetch_add(1, std::memory_order_relaxed);
}

void Stats::record(OpId op, Mode m) {
  slot(op, static_cast<int>(m)).fetch_add(1, std::memory_order_relaxed);
}

int64_t Stats::count(OpId op, Strategy s) const {
  return slot(op, static_cast<int>(s)).load(std::memory_order_relaxed);
}

int64_t Stats::count(OpId op, Mode m) const {
  return slot(op, static_cast<int>(m)).load(std::memory_order_relaxed);
}

void Stats::record(TransportPath p) {
  transport_[static_cast<int>(p)].fetch_add(1, std::memory_order_relaxed);
}

int64_t Stats::count(TransportPath p) const {
  return transport_[static_cast<int>(p)].load(std::memory_order_relaxed);
}

std::vector<std::pair<std::string, int64_t>> Stats::snapshot() const {
  std::vector<std::pair<std::string, int64_t>> out;
  for (int i = 0; i < static_cast<int>(OpId::kCount); ++i) {
    const OpId op = static_cast<OpId>(i);
    for (int path = 0; path < kPaths; ++path) {
      const char* path_name = is_layout_invariant(op) ? mode_name(static_cast<Mode>(path))
                                                      : strategy_name(static_cast<Strategy>(path));
      out.emplace_back(std::string(op_name(op)) + "." + path_name,
                       slot(op, path).load(std::memory_order_relaxed));
    }
  }
  for (int i = 0; i < static_cast<int>(TransportPath::kCount); ++i) {
    out.emplace_back(transport_path_name(static_cast<TransportPath>(i)),
                     transport_[i].load(std::memory_order_relaxed));
  }
  return out;
}

void Stats::reset() {
  for (auto& c : counts_) c.store(0, std::memory_order_relaxed);
  for (auto& c : transport_) c.store(0, std::memory_order_relaxed);
}

}  // namespace flashcomm::core
