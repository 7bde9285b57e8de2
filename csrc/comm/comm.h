// The only code that talks to a c10d ProcessGroup. Ops above this layer see
// groups as opaque handles and collectives as async Work handles, so the same
// op runs over gloo (CPU), NCCL (CUDA) or HCCL (Ascend) without change.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace flashcomm::comm {

using Group = c10::intrusive_ptr<c10d::ProcessGroup>;
using Work = c10::intrusive_ptr<c10d::Work>;

// The group registered under `group_name` (Python: `pg.group_name`).
// Throws, naming `op` and the name, when no such group exists.
Group resolve_group(const std::string& group_name, const char* op);

// Async reduce-scatter of `input` ([tp * m, ...], contiguous) into `output`
// ([m, ...], contiguous): rank r receives the sum over ranks of input block r.
Work reduce_scatter(at::Tensor& output, at::Tensor& input, const Group& group);

// Async all-gather of `input` ([m, ...], contiguous) into `output`
// ([tp * m, ...], contiguous): block r of the output is rank r's input.
Work all_gather(at::Tensor& output, at::Tensor& input, const Group& group);

// Async in-place sum of `tensor` (contiguous) over the group, or, when the group has
// an all-reduce provider, a synchronous sum through it (the Work is then null).
Work all_reduce(at::Tensor& tensor, const Group& group);

// Waits for `work` (null: already complete); a failure or timeout is rethrown naming
// the op and group.
void wait(const Work& work, const char* op, const Group& group);

// All-reduce provider of one group: a registered torch op with vLLM's schema
// `all_reduce(Tensor tensor, str group_name) -> Tensor` (e.g. "vllm::all_reduce") and
// the name the provider knows the same ranks by. flashcomm's all-reduces on the group
// (the replicated row-parallel path) then run through it instead of the ProcessGroup,
// so a serving engine's own communicator (vLLM: shared memory on CPU, custom
// all-reduce / pynccl on CUDA) carries them. Reduce-scatters and all-gathers stay on
// the ProcessGroup. It changes the transport, not the collective pattern, but must
// still be set identically on every rank (the agreement check compares it).
// Throws, naming `op_name`, when no such op with that schema is registered.
void set_all_reduce_provider(const std::string& group_name, const std::string& op_name,
                             const std::string& provider_group);
void clear_all_reduce_provider(const std::string& group_name);
// "op_name(provider_group)" for a group with a provider, "" otherwise.
std::string all_reduce_provider(const std::string& group_name);

}  // namespace flashcomm::comm
