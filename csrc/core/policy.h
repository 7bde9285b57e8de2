// Kernel-strategy policy of the compact ops. Torch-free.
//
// Invariant (docs/DESIGN.md section 4): every input of these functions is
// rank-invariant -- the global token count, the group size, op shapes and the
// process-wide configuration, which is verified identical across ranks -- so
// every rank picks the same strategy and issues the same collectives.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include <flashcomm/defaults.h>

namespace flashcomm::core {

enum class Strategy : int { kSequential = 0, kPipelined = 1 };

const char* strategy_name(Strategy s);

// Threshold used when an op is called with threshold < 0 ("auto") and no
// tuning-table entry matches its shape (include/flashcomm/defaults.h).
using ::flashcomm::kDefaultThreshold;

// pipelined iff enabled && (tp > 1 || force_collectives) && n_global > threshold.
// `threshold` must already be resolved (>= 0); see resolve_threshold.
// force_collectives: a one-rank group that takes every path a larger group takes
// (the FLASHCOMM_DEBUG_FORCE_COLLECTIVES debug setting).
Strategy choose_strategy(int64_t n_global, int64_t tp, int64_t threshold, bool enabled,
                         bool force_collectives = false);

// Layout mode of the layout-invariant ops (docs/DESIGN.md section 3): replicated =
// all token rows valid on every rank (plain TP); sharded = rank r's owned rows
// valid. One model-wide sp_threshold, identical in every op of a forward pass.
enum class Mode : int { kReplicated = 0, kSharded = 1 };

const char* mode_name(Mode m);

// sharded iff enabled && (tp > 1 || force_collectives) && n > sp_threshold.
Mode choose_mode(int64_t n, int64_t tp, int64_t sp_threshold, bool enabled,
                 bool force_collectives = false);

// Key of one op shape in the tuning table. `dtype` is a short string such as
// "float32", "bfloat16" or "int8" so this layer stays torch-free.
struct ShapeKey {
  std::string op;
  int64_t k = 0;
  int64_t n = 0;
  int64_t tp = 0;
  std::string dtype;
  bool operator<(const ShapeKey& o) const {
    return std::tie(op, k, n, tp, dtype) < std::tie(o.op, o.k, o.n, o.tp, o.dtype);
  }
};

// Process-wide crossover table consulted for threshold < 0. Empty until a
// tuning table is loaded; thread-safe.
class ThresholdTable {
 public:
  static ThresholdTable& instance();
  void set(const ShapeKey& key, int64_t threshold);
  std::optional<int64_t> lookup(const ShapeKey& key) const;
  void clear();
  size_t size() const;
  // Canonical text of every entry (sorted), for hashing across ranks.
  std::string describe() const;

 private:
  mutable std::mutex mu_;
  std::map<ShapeKey, int64_t> table_;
};

// threshold >= 0 is returned unchanged; threshold < 0 means auto: the table's
// value for `key` if present, else kDefaultThreshold.
int64_t resolve_threshold(int64_t threshold, const ShapeKey& key);

// Chunking of the pipelined kernels. Part of the configuration that steers the
// collective pattern, so it must be set identically on every rank.
struct PipelineConfig {
  int64_t max_chunks = kDefaultMaxChunks;         // collectives per pipelined call (upper bound)
  int64_t min_chunk_rows = kDefaultMinChunkRows;  // rows of each rank block per chunk (lower bound)
};

PipelineConfig pipeline_config();
void set_pipeline_config(const PipelineConfig& config);

// Bitwise mode invariance (README "Numerics across the threshold"): when on, the
// replicated path of a layout-invariant op takes the sharded path's form wherever
// the plain form could sum or multiply in another order (c10d at tp >= 3, an
// all-reduce provider, flashcomm's own GEMMs), so both modes give bitwise the same
// rows. Process-wide; steers collectives, so part of the rank agreement. Default:
// FLASHCOMM_BITWISE_MODES ("0" / "1"), read at first use, else off
// (kDefaultBitwiseModes). An unparsable value throws std::invalid_argument.
bool bitwise_modes();
void set_bitwise_modes(bool on);

}  // namespace flashcomm::core
