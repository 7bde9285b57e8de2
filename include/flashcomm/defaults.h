// The defaults every layer of flashcomm takes from here (C++, the op schemas, and
// Python through torch.ops.flashcomm.defaults()). Torch-free.
#pragma once

#include <cstdint>

namespace flashcomm {

// Compact kernels: pipelined iff n_global > threshold (threshold < 0 = auto: the
// tuning table's crossover for the op shape, else this).
inline constexpr int64_t kDefaultThreshold = 1000;

// Layout-invariant ops: sharded iff n > sp_threshold.
inline constexpr int64_t kDefaultSpThreshold = 1000;

// Chunking of the pipelined strategy: collectives per call (upper bound) and rows
// of each rank block per chunk (lower bound).
inline constexpr int64_t kDefaultMaxChunks = 4;
inline constexpr int64_t kDefaultMinChunkRows = 16;

// Bitwise mode invariance of the layout-invariant ops (FLASHCOMM_BITWISE_MODES):
// off by default; its cost at decode sizes is in BENCHMARKS.md.
inline constexpr bool kDefaultBitwiseModes = false;

}  // namespace flashcomm
