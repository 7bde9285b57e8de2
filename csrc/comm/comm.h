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

// Async in-place sum of `tensor` (contiguous) over the group.
Work all_reduce(at::Tensor& tensor, const Group& group);

// Waits for `work`; a failure or timeout is rethrown naming the op and group.
void wait(const Work& work, const char* op, const Group& group);

}  // namespace flashcomm::comm
