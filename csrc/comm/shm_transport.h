// The host shared-memory transport (transport.h): CPU ranks of one group on one
// host, each with one POSIX shared-memory segment of two slots, mapped by every
// peer. Built on the torch-free segment protocol of csrc/core/shm.
#pragma once

#include <cstdint>
#include <memory>

#include "comm/comm.h"
#include "comm/transport.h"

namespace flashcomm::comm {

// Bytes of shared memory per rank per group (two slots of half of it each) when
// FLASHCOMM_SHM_BYTES is unset. Larger tensors are streamed through the slots. Small on
// purpose: a step's data is still in cache when the peers read it (in-place all-reduce
// of 32 MiB, 2 ranks on a 2-core Xeon: 6.5-7.3 ms with 0.5-2 MiB, 9.4-21 ms with 32 MiB).
inline constexpr int64_t kDefaultShmBytes = int64_t{2} << 20;

// FLASHCOMM_SHM_BYTES, else kDefaultShmBytes (an error names the variable when
// it is not an integer in [64 KiB, 2 TiB]).
int64_t shm_bytes_from_env();

// All-reduces (plain and fused steps) of at least this many bytes per rank run two-shot
// (reduce-scatter of the slots, each rank summing 1/tp of the elements into its next slot,
// then an all-gather of those sums) instead of one-shot (every rank sums every slot). Per
// rank and step of S bytes, one-shot reads tp*S of slots; two-shot reads 2*S and writes S/tp
// more, at the price of a second synchronisation. Hence by group size: at tp = 2 one-shot
// reads no more than two-shot (never switch); from tp = 3 two-shot from this size on.
inline constexpr int64_t kDefaultTwoShotBytes = int64_t{256} << 10;

// FLASHCOMM_SHM_TWO_SHOT_BYTES: -1 (unset: by group size, above), 0 (always two-shot), or a
// byte count; an error names the variable otherwise. Rank-invariant (agreed with the settings).
int64_t shm_two_shot_bytes_from_env();
// The threshold a group of `tp` ranks uses for `setting` (the value above); INT64_MAX: never.
int64_t two_shot_threshold(int64_t setting, int64_t tp);

// Whether the reductions of the fused GEMM + reduce-scatter steps run on a helper thread,
// overlapped with the GEMM of the next step, or back to back on the calling thread while
// the slots are still in cache. auto: overlapped when
// the CPUs this rank shares with its peers outnumber the GEMM threads they all run (a core
// left for the helper), e.g. ranks bound to 8 cores each with 7 intra-op threads.
enum class ShmOverlap : int { kAuto = 0, kOn = 1, kOff = 2 };
// FLASHCOMM_SHM_OVERLAP = auto (unset) or a boolean (core/settings.h); an error names the
// variable otherwise.
ShmOverlap shm_overlap_from_env();

// How long a waiting rank spins and yields before it sleeps, in µs, when
// FLASHCOMM_SHM_YIELD_US is unset. Decode steps see peers a few hundred µs late, hence a
// yield phase long enough that a step rarely pays a timer's latency.
inline constexpr int64_t kDefaultYieldUs = 5000;
// FLASHCOMM_SHM_YIELD_US: an integer in [0, 60000000] (0: sleep at once); an error names the
// variable otherwise.
int64_t shm_yield_us_from_env();

// This group's shared-memory settings, read from the environment at its first use (so a bad
// value is an error then, in auto mode too, naming the variable).
struct ShmSettings {
  int64_t bytes = kDefaultShmBytes;           // FLASHCOMM_SHM_BYTES (agreed)
  int64_t two_shot_bytes = -1;                // FLASHCOMM_SHM_TWO_SHOT_BYTES (agreed)
  ShmOverlap overlap = ShmOverlap::kAuto;     // FLASHCOMM_SHM_OVERLAP (local)
  int64_t yield_us = kDefaultYieldUs;         // FLASHCOMM_SHM_YIELD_US (local)
  DebugThrow debug_throw = DebugThrow::kNone;  // FLASHCOMM_DEBUG_THROW (local, tests only)
  bool debug_unmappable = false;      // FLASHCOMM_DEBUG_SHM_UNMAPPABLE (local, tests only)
  bool debug_die_after_create = false;  // FLASHCOMM_DEBUG_SHM_DIE_AFTER_CREATE (tests only)
  static ShmSettings from_env();
};

// Collective over the group. The shared-memory transport when every rank is a CPU
// process on this host whose segment every peer can map (proven by a token each
// rank writes and every peer reads back), agreed through the ProcessGroup;
// otherwise nullptr and one log line saying why -- or, when `required`, an error
// saying why on every rank.
std::unique_ptr<Transport> try_make_shm_transport(const Group& group, const at::Device& device,
                                                  bool required, const ShmSettings& settings);

}  // namespace flashcomm::comm
