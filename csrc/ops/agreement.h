// Rank agreement at a group's first use (see csrc/core/agreement.h).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "comm/comm.h"
#include "core/agreement.h"

namespace flashcomm::ops {

// Checks once per group and process, at its first use by any op: every rank
// must hold the same global settings and the same `call_settings` (the first
// call's thresholds / enabled flag). All ranks reach a group's first use in the
// same op call, so the check's own collective lines up. A mismatch raises the
// same error, naming the settings, on every rank. No-op for tp == 1.
void ensure_agreement(const char* op, const comm::Group& group, const at::Device& device,
                      const std::vector<core::Setting>& call_settings);

// Makes the group's next use check again (after a setting of the group changed).
void forget_agreement(const comm::Group& group);

// The same check, unconditionally (flashcomm.init): must be called on every rank.
void verify_agreement(const char* op, const comm::Group& group, const at::Device& device,
                      const std::vector<core::Setting>& call_settings);

}  // namespace flashcomm::ops
