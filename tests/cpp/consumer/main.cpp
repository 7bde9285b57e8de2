// Uses flashcomm as an installed package: a 1-rank gloo group made in C++, the
// layout-invariant row-parallel linear with collectives forced on (so the group's
// transport is set up and used), checked against a dense product.
#include <ATen/ATen.h>
#include <flashcomm/flashcomm.h>
#include <flashcomm/version.h>

#include <cstdlib>
#include <iostream>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

int main() {
  setenv("FLASHCOMM_DEBUG_FORCE_COLLECTIVES", "1", 1);  // a one-rank group communicates
  auto store = c10::make_intrusive<c10d::HashStore>();
  auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, 0, 1, opts);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, 0, 1);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, backend);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  group->setGroupName("consumer");

  const at::Tensor x = at::randn({2049, 64}), w = at::randn({32, 64});
  const at::Tensor out = flashcomm::sp_row_linear(x, w, std::nullopt, group, /*sp_threshold=*/16);
  const double err = (out - at::mm(x, w.t())).abs().max().item<double>();
  int64_t sharded = 0;
  for (const auto& [name, count] : flashcomm::stats()) {
    if (name == "sp_row_linear.sharded") sharded = count;
  }
  std::cout << "flashcomm " << FLASHCOMM_VERSION_STRING << ": max error " << err
            << ", sharded calls " << sharded << "\n";
  if (err > 1e-3 || sharded != 1) return 1;
  std::cout << "flashcomm consumer: ok\n";
  return 0;
}
