#include "ops/agreement.h"

#include <mutex>
#include <set>
#include <string>

namespace flashcomm::ops {

namespace {

std::mutex g_verified_mu;
std::set<int64_t> g_verified;  // ProcessGroup ids (object addresses) already checked

}  // namespace

void verify_agreement(const char* op, const comm::Group& group, const at::Device& device,
                      const std::vector<core::Setting>& call_settings) {
  const int64_t tp = group->getSize();
  if (tp > 1) {
    std::vector<core::Setting> settings = core::global_settings();
    settings.push_back({"all-reduce provider of the group",
                        core::stable_hash(comm::all_reduce_provider(group->getGroupName()))});
    settings.insert(settings.end(), call_settings.begin(), call_settings.end());
    const int64_t count = static_cast<int64_t>(settings.size());
    at::Tensor mine = at::empty({count}, at::TensorOptions().dtype(at::kLong));
    for (int64_t i = 0; i < count; ++i) mine[i] = settings[i].value;
    mine = mine.to(device);
    at::Tensor all = at::empty({tp * count}, mine.options());
    comm::wait(comm::all_gather(all, mine, group), op, group);
    all = all.cpu();
    const std::vector<int64_t> values(all.data_ptr<int64_t>(),
                                      all.data_ptr<int64_t>() + tp * count);
    const std::string diff = core::describe_disagreement(settings, values, tp);
    TORCH_CHECK(diff.empty(), op, ": the ranks of group '", group->getGroupName(),
                "' disagree on settings that steer collectives: ", diff,
                ". Every rank must use the same flashcomm version, thresholds, enabled flags, "
                "pipeline config and tuning table; otherwise ranks would issue different "
                "collectives and hang.");
  }
  std::lock_guard<std::mutex> lock(g_verified_mu);
  g_verified.insert(group->getID());
}

void forget_agreement(const comm::Group& group) {
  std::lock_guard<std::mutex> lock(g_verified_mu);
  g_verified.erase(group->getID());
}

void ensure_agreement(const char* op, const comm::Group& group, const at::Device& device,
                      const std::vector<core::Setting>& call_settings) {
  if (group->getSize() == 1) return;
  {
    std::lock_guard<std::mutex> lock(g_verified_mu);
    if (g_verified.count(group->getID())) return;
  }
  verify_agreement(op, group, device, call_settings);
}

}  // namespace flashcomm::ops
