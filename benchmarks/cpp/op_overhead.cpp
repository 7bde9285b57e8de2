// The fixed per-call cost of flashcomm's ops at decode sizes: each layout-invariant
// op in replicated mode on a one-rank group (no collective: what is left is the op's
// own work -- group resolution, agreement flag, mode, counters, allocation, argument
// checks), called through the dispatcher as a compiled graph calls it and through the
// C++ API, against the bare computation (at::mm_out / the norm's arithmetic).
//
//   build/cmake/op_overhead [calls]      (built with FLASHCOMM_BUILD_TESTS)
// Prints median ns per call over 7 rounds. Figures, not pass/fail.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <flashcomm/flashcomm.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <vector>

namespace {

double median_ns(const std::function<void()>& fn, int calls) {
  for (int i = 0; i < calls / 10 + 10; ++i) fn();
  std::vector<double> rounds;
  for (int r = 0; r < 7; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) fn();
    const auto t1 = std::chrono::steady_clock::now();
    rounds.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / calls);
  }
  std::sort(rounds.begin(), rounds.end());
  return rounds[rounds.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int calls = argc > 1 ? std::atoi(argv[1]) : 20000;
  at::set_num_threads(1);
  auto store = c10::make_intrusive<c10d::HashStore>();
  auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, 0, 1, opts);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, 0, 1);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, backend);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  group->setGroupName("op_overhead");
  c10d::register_process_group("op_overhead", group);
  const std::string name = "op_overhead";

  auto& dispatcher = c10::Dispatcher::singleton();
  auto norm_op = dispatcher.findSchemaOrThrow("flashcomm::sp_add_rms_norm", "")
                     .typed<std::tuple<at::Tensor, at::Tensor>(
                         const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                         double, const std::string&, int64_t, bool, bool)>();
  auto reduce_op = dispatcher.findSchemaOrThrow("flashcomm::sp_reduce", "")
                       .typed<at::Tensor(const at::Tensor&, const std::string&, int64_t, bool)>();
  auto row_op = dispatcher.findSchemaOrThrow("flashcomm::sp_row_linear", "")
                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, const std::string&, int64_t,
                                      bool, int64_t)>();

  std::printf("calls per round %d, 1 thread, median of 7 rounds, ns per call\n", calls);
  std::printf("%-44s %10s %10s %10s %10s\n", "case (bf16, H=512, N=1536)", "n=1", "n=8", "n=16",
              "");
  struct Row {
    const char* name;
    std::function<std::function<void()>(int64_t)> make;
  };
  const at::TensorOptions bf16 = at::TensorOptions().dtype(at::kBFloat16);
  const at::Tensor w = at::randn({1536, 512}, bf16), nw = at::ones({512}, bf16);
  std::vector<Row> rows = {
      {"bare: at::mm_out", [&](int64_t n) {
         auto x = at::randn({n, 512}, bf16);
         auto out = at::empty({n, 1536}, bf16);
         auto wt = w.t();
         return std::function<void()>([=]() mutable { at::mm_out(out, x, wt); });
       }},
      {"sp_row_linear, C++ API", [&](int64_t n) {
         auto x = at::randn({n, 512}, bf16);
         return std::function<void()>([=] { flashcomm::sp_row_linear(x, w, std::nullopt, group); });
       }},
      {"sp_row_linear, dispatcher", [&](int64_t n) {
         auto x = at::randn({n, 512}, bf16);
         return std::function<void()>([=] { row_op.call(x, w, std::nullopt, name, 1000, true, -1); });
       }},
      {"bare: add + rms norm in ATen (4 ops)", [&](int64_t n) {
         auto x = at::randn({n, 512}, bf16), r = at::randn({n, 512}, bf16);
         return std::function<void()>([=] {
           auto s = x.to(at::kFloat) + r.to(at::kFloat);
           (s * at::rsqrt(s.pow(2).mean(-1, true) + 1e-6)).to(at::kBFloat16);
         });
       }},
      {"sp_add_rms_norm, C++ API", [&](int64_t n) {
         auto x = at::randn({n, 512}, bf16), r = at::randn({n, 512}, bf16);
         return std::function<void()>([=] { flashcomm::sp_add_rms_norm(x, r, nw, 1e-6, group); });
       }},
      {"sp_add_rms_norm, dispatcher", [&](int64_t n) {
         auto x = at::randn({n, 512}, bf16), r = at::randn({n, 512}, bf16);
         return std::function<void()>([=] { norm_op.call(x, r, nw, 1e-6, name, 1000, true, true); });
       }},
      {"sp_reduce, dispatcher (copy only)", [&](int64_t n) {
         auto x = at::randn({n, 1536}, bf16);
         return std::function<void()>([=] { reduce_op.call(x, name, 1000, true); });
       }},
      {"bare: empty + copy_ of the same", [&](int64_t n) {
         auto x = at::randn({n, 1536}, bf16);
         return std::function<void()>([=] { at::empty_like(x).copy_(x); });
       }},
  };
  for (const Row& row : rows) {
    std::printf("%-44s", row.name);
    for (int64_t n : {1, 8, 16}) std::printf(" %10.0f", median_ns(row.make(n), calls));
    std::printf("\n");
  }
  return 0;
}
