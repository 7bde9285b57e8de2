// The c10d transport: every collective through the group's ProcessGroup.
#pragma once

#include <memory>
#include <string>

#include "comm/comm.h"
#include "comm/transport.h"

namespace flashcomm::comm {

struct C10dOptions {
  // FLASHCOMM_DEBUG_CHECK=1: before each collective the ranks all-gather its
  // fingerprint (kind, dtype, bytes, the op, its n, mode and strategy) and a
  // difference raises the same clear error on every rank, instead of the
  // undefined behaviour of mismatched c10d collectives (gloo aborts the process).
  bool debug_check = false;
};

std::unique_ptr<Transport> make_c10d_transport(const ProcessGroupPtr& pg, std::string group_name,
                                               const C10dOptions& options);

}  // namespace flashcomm::comm
