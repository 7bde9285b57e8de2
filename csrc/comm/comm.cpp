#include "comm/comm.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

namespace flashcomm::comm {

namespace {

using AllReduceFn = at::Tensor(const at::Tensor&, c10::string_view);

struct AllReduceProvider {
  c10::TypedOperatorHandle<AllReduceFn> handle;
  std::string op_name;
  std::string provider_group;
};

std::mutex g_providers_mu;
// By c10d group name; immutable entries, shared so the all-reduce path copies nothing.
std::map<std::string, std::shared_ptr<const AllReduceProvider>> g_providers;

std::shared_ptr<const AllReduceProvider> provider_for(const std::string& group_name) {
  std::lock_guard<std::mutex> lock(g_providers_mu);
  auto it = g_providers.find(group_name);
  return it == g_providers.end() ? nullptr : it->second;
}

}  // namespace

void set_all_reduce_provider(const std::string& group_name, const std::string& op_name,
                             const std::string& provider_group) {
  const auto sep = op_name.find("::");
  TORCH_CHECK(sep != std::string::npos && sep > 0 && sep + 2 < op_name.size(),
              "set_all_reduce_provider: op must be a qualified op name like "
              "'vllm::all_reduce', got '", op_name, "'");
  auto handle = c10::Dispatcher::singleton().findSchema({op_name, ""});
  TORCH_CHECK(handle.has_value(), "set_all_reduce_provider: no op '", op_name,
              "' is registered (is the library that defines it, e.g. vLLM, imported?)");
  std::optional<c10::TypedOperatorHandle<AllReduceFn>> typed;
  try {
    typed = handle->typed<AllReduceFn>();
  } catch (const std::exception&) {
    TORCH_CHECK(false, "set_all_reduce_provider: op '", op_name,
                "' must have the schema (Tensor tensor, str group_name) -> Tensor, got ",
                handle->schema());
  }
  auto provider = std::make_shared<const AllReduceProvider>(
      AllReduceProvider{*typed, op_name, provider_group});
  std::lock_guard<std::mutex> lock(g_providers_mu);
  g_providers.insert_or_assign(group_name, std::move(provider));
}

void clear_all_reduce_provider(const std::string& group_name) {
  std::lock_guard<std::mutex> lock(g_providers_mu);
  g_providers.erase(group_name);
}

std::string all_reduce_provider(const std::string& group_name) {
  const auto provider = provider_for(group_name);
  return provider ? provider->op_name + "(" + provider->provider_group + ")" : std::string();
}

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
  if (const auto provider = provider_for(group->getGroupName())) {
    at::Tensor sum;
    try {
      sum = provider->handle.call(tensor, provider->provider_group);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "all-reduce provider ", provider->op_name, " (group '",
                  provider->provider_group, "', for c10d group '", group->getGroupName(),
                  "') failed: ", e.what());
    }
    TORCH_CHECK(sum.sizes() == tensor.sizes() && sum.scalar_type() == tensor.scalar_type(),
                "all-reduce provider ", provider->op_name, " returned ", sum.sizes(), " ",
                sum.scalar_type(), ", expected ", tensor.sizes(), " ", tensor.scalar_type());
    if (!sum.is_same(tensor)) tensor.copy_(sum);
    return Work();
  }
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  return group->allreduce(tensors, opts);
}

void wait(const Work& work, const char* op, const Group& group) {
  if (!work) return;  // completed synchronously (all-reduce provider)
  try {
    work->wait();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": collective on group '", group->getGroupName(), "' (size ",
                group->getSize(), ", rank ", group->getRank(), ") failed: ", e.what());
  }
}

}  // namespace flashcomm::comm
