// The communication layer: the only code that talks to a c10d ProcessGroup or to
// shared memory. The ops above it see a Group (resolved once per call) and its
// Transport (transport.h); the same op runs over gloo, NCCL, HCCL or host shared
// memory without change.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <utility>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <vector>

#include "comm/transport.h"
#include "core/agreement.h"

namespace flashcomm::comm {

using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

enum class TransportKind : int { kAuto = 0, kC10d = 1, kShm = 2 };
const char* transport_kind_name(TransportKind kind);
// "auto" | "c10d" | "shm"; anything else: an error naming `what` and the value.
TransportKind parse_transport_kind(const std::string& text, const char* what);

struct GroupState;  // per c10d group name: transport, agreement, provider (comm.cpp)

// FLASHCOMM_DEBUG_THROW (test-only fault injection, read at a group's first use): `gemm`
// throws a C++ exception from the GEMM of every fused reduction step, `sum` from every sum of
// a shared-memory reduction. Unset or empty: none; anything else is an error naming it.
enum class DebugThrow : int { kNone = 0, kGemm = 1, kSum = 2 };
DebugThrow debug_throw_from_env();
// Throws std::runtime_error("... injected by FLASHCOMM_DEBUG_THROW=<at>") when configured == at.
void debug_throw_if(DebugThrow configured, DebugThrow at);

// A group as one op call sees it. Resolving it once per call hands every level
// below the same {process group, name, size, rank} instead of re-deriving them.
class Group {
 public:
  const std::string& name() const { return name_; }
  int64_t size() const { return size_; }
  int64_t rank() const { return rank_; }
  // The ops communicate on this group: size > 1, or the debug setting
  // FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1 (read when the group is first used), which
  // makes a one-rank group take every collective path a larger group takes.
  bool collective() const { return collective_; }
  c10d::ProcessGroup& process_group() const { return *pg_; }
  const ProcessGroupPtr& process_group_ptr() const { return pg_; }
  // The transport the ranks agreed on (valid once ensure_ready() returned).
  Transport& transport() const;
  GroupState& state() const { return *state_; }

 private:
  friend Group make_group(ProcessGroupPtr pg, std::string name, const char* op);
  ProcessGroupPtr pg_;
  std::string name_;
  int64_t size_ = 1;
  int64_t rank_ = 0;
  bool collective_ = false;
  std::shared_ptr<GroupState> state_;
};

// The group's FLASHCOMM_DEBUG_THROW.
DebugThrow debug_throw(const Group& g);

// The group registered with c10d under `group_name` (Python: `pg.group_name`).
// Throws, naming `op` and the name, when no such group exists.
Group resolve(const std::string& group_name, const char* op);
// The same for a ProcessGroup handle (C++ API). A group without a c10d name is
// keyed by its address.
Group resolve(const ProcessGroupPtr& pg, const char* op);

// At a group's first use (and again after something the ranks must agree on
// changed): the ranks compare their collective-steering settings -- library
// version, pipeline chunking, tuning table, all-reduce provider, transport request
// and budget, plus the call's `call_settings` -- and a difference becomes the same
// clear error on every rank; then they choose the transport together (transport.h).
// Collective over the group's ProcessGroup on `device`. Refuses to run while the
// current stream of `device` is capturing a CUDA graph (call flashcomm.init first).
// A no-op once done, and for a group that does not communicate.
// `call_settings` are (name, value) pairs of string literals: nothing is built on
// the hot path, where the group is ready.
using CallSettings = std::initializer_list<std::pair<const char*, int64_t>>;
void ensure_ready(const Group& group, const char* op, const at::Device& device,
                  CallSettings call_settings);
// The same check run unconditionally (flashcomm.init): verifies again even when
// the group is ready.
void verify(const Group& group, const char* op, const at::Device& device,
            const std::vector<core::Setting>& call_settings);

// Every rank's values of `local` (a small int64 tensor on a device the group's
// backend serves), all-gathered over the ProcessGroup itself, never the
// transport: used by the agreement check and by the transports' own set-up.
// Returns size() * local.numel() values, rank-major, on the host.
std::vector<int64_t> exchange_over_process_group(const Group& group, const at::Tensor& local,
                                                 const char* op);

// The replicated path's all-reduce of `t` (in place): through the group's
// all-reduce provider when one is set, else its transport.
void all_reduce(const Group& group, at::Tensor& t, const CallInfo& call);
// True when the group's all-reduces go through a provider (fused GEMM + all-reduce
// steps then do not apply).
bool has_all_reduce_provider(const Group& group);

// All-reduce provider of one group: a registered torch op with vLLM's schema
// `all_reduce(Tensor tensor, str group_name) -> Tensor` (e.g. "vllm::all_reduce")
// and the name the provider knows the same ranks by. The group's all-reduces (the
// replicated row-parallel path) then run through it, so a serving engine's own
// communicator carries them; reduce-scatters and all-gathers stay on the transport.
// It changes the transport of one collective, not the pattern, but must be set
// identically on every rank: the ranks compare it at the group's next use.
// Throws, naming `op_name`, when no such op with that schema is registered.
void set_all_reduce_provider(const std::string& group_name, const std::string& op_name,
                             const std::string& provider_group);
void clear_all_reduce_provider(const std::string& group_name);
// "op_name(provider_group)" for a group with a provider, "" otherwise.
std::string all_reduce_provider(const std::string& group_name);

// Transport request of a group, before its first use (later: an error). Default:
// FLASHCOMM_TRANSPORT (auto | c10d | shm), else auto.
void set_transport(const std::string& group_name, TransportKind kind);
// Name of the transport a ready group uses ("c10d", "shm"), or "" before first use.
std::string transport_name(const std::string& group_name);

// Debug hook for tests of the capture refusal: makes ensure_ready() believe the
// current stream is capturing a CUDA graph.
void set_capturing_for_testing(bool capturing);

}  // namespace flashcomm::comm
