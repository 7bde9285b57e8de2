#include "comm/comm.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

namespace flashcomm::comm {

Group resolve_group(const std::string& group_name, const char* op) {
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const std::exception&) {
    TORCH_CHECK(false, op, ": unknown group_name '", group_name,
                "': expected the group_name of an initialised c10d ProcessGroup "
                "(e.g. torch.distributed.group.WORLD.group_name)");
  }
}

Work reduce_scatter(at::Tensor& output, at::Tensor& input, const Group& group) {
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  return group->reduce_scatter_single(output, input, opts);
}

Work all_gather(at::Tensor& output, at::Tensor& input, const Group& group) {
  return group->all_gather_single(output, input, c10d::AllgatherOptions());
}

Work all_reduce(at::Tensor& tensor, const Group& group) {
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  return group->allreduce(tensors, opts);
}

void wait(const Work& work, const char* op, const Group& group) {
  try {
    work->wait();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": collective on group '", group->getGroupName(), "' (size ",
                group->getSize(), ", rank ", group->getRank(), ") failed: ", e.what());
  }
}

}  // namespace flashcomm::comm
