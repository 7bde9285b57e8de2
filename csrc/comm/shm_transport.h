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
// it is not a positive integer of at least 64 KiB).
int64_t shm_bytes_from_env();

// Collective over the group. The shared-memory transport when every rank is a CPU
// process on this host whose segment every peer can map (proven by a token each
// rank writes and every peer reads back), agreed through the ProcessGroup;
// otherwise nullptr and one log line saying why -- or, when `required`, an error
// saying why on every rank.
std::unique_ptr<Transport> try_make_shm_transport(const Group& group, const at::Device& device,
                                                  bool required, int64_t shm_bytes);

}  // namespace flashcomm::comm
