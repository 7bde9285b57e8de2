// Per-op call counters, so tests and users can see which path actually ran
// (also inside compiled graphs): the kernel strategy of the compact ops, the
// layout mode of the layout-invariant ops. Torch-free, lock-free.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/policy.h"

namespace flashcomm::core {

enum class OpId : int {
  // compact ops: counted per Strategy
  kGemmRs = 0,
  kAgGemm,
  kGemmRsW8A8,
  kAgGemmW8A8,
  // layout-invariant ops: counted per Mode
  kSpRowLinear,
  kSpColumnLinear,
  kSpRowLinearW8A8,
  kSpColumnLinearW8A8,
  kSpAddRmsNorm,
  kSpReduce,
  kSpGather,
  kCount
};

const char* op_name(OpId op);
bool is_layout_invariant(OpId op);

// Steps of the shared-memory transport by algorithm, so tests see which one ran:
// all-reduce steps one-shot or two-shot; reduce-scatter steps summed by the
// calling thread or, overlapped with the next step's GEMM, by the transport's helper.
enum class TransportPath : int {
  kAllReduceOneShot = 0,
  kAllReduceTwoShot,
  kReduceInline,
  kReduceOverlapped,
  kCount
};
// "shm_all_reduce.one_shot", ...: "<what>.<how>" like the op counters.
const char* transport_path_name(TransportPath p);

class Stats {
 public:
  static Stats& instance();
  void record(OpId op, Strategy s);
  void record(OpId op, Mode m);
  int64_t count(OpId op, Strategy s) const;
  int64_t count(OpId op, Mode m) const;
  void record(TransportPath p);
  int64_t count(TransportPath p) const;
  // ("<op>.<path>", count) for every op and its two paths ("sequential" /
  // "pipelined" or "replicated" / "sharded"), then every TransportPath, zeros included.
  std::vector<std::pair<std::string, int64_t>> snapshot() const;
  void reset();

 private:
  static constexpr int kPaths = 2;
  std::atomic<int64_t>& slot(OpId op, int path);
  const std::atomic<int64_t>& slot(OpId op, int path) const;
  std::array<std::atomic<int64_t>, static_cast<int>(OpId::kCount) * kPaths> counts_{};
  std::array<std::atomic<int64_t>, static_cast<int>(TransportPath::kCount)> transport_{};
};

}  // namespace flashcomm::core
