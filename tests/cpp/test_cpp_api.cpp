// The public C++ API (include/flashcomm/flashcomm.h) on a real 2-rank gloo
// ProcessGroup created in C++ (ranks are threads over an in-process HashStore),
// against dense single-process references.
//
// Note: only out-of-line torch functions create gloo objects here. Constructing
// a polymorphic gloo type in this file would emit its vtable from Debian's
// (older) gloo headers, which are used for declarations only.
#include <ATen/ATen.h>
#include <flashcomm/flashcomm.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <thread>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <vector>

namespace {

constexpr int kWorld = 2;

flashcomm::GroupPtr make_group(const c10::intrusive_ptr<c10d::Store>& store, int rank) {
  auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
  opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, kWorld, opts);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, kWorld);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, backend);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  group->setGroupName("cpp_api_test");
  return group;
}

// Runs fn(rank, group) on kWorld threads; returns each rank's failure text ("" = ok).
std::vector<std::string> run_ranks(const std::function<void(int, const flashcomm::GroupPtr&)>& fn) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::string> errors(kWorld);
  std::vector<std::thread> threads;
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r, make_group(store, r));
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  const double scale = std::max(want.abs().max().item<double>(), 1e-12);
  return (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>() / scale;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

class CppApi : public ::testing::TestWithParam<int64_t> {};

// gemm_rs: x [n, K] split along K over the ranks; rank r returns rows [r*c, r*c+c).
TEST_P(CppApi, GemmRsMatchesDense) {
  const int64_t n = GetParam(), K = 32, N = 24, c = ceil_div(n, kWorld);
  at::manual_seed(0);
  const at::Tensor x = at::randn({n, K}), w = at::randn({N, K}), b = at::randn({N});
  const at::Tensor want = at::addmm(b.to(at::kDouble), x.to(at::kDouble), w.to(at::kDouble).t());
  std::vector<at::Tensor> outs(kWorld);
  std::vector<int64_t> pipelined(kWorld);
  const auto errors = run_ranks([&](int rank, const flashcomm::GroupPtr& group) {
    const int64_t k = K / kWorld;
    flashcomm::reset_stats();
    outs[rank] = flashcomm::gemm_rs(x.narrow(1, rank * k, k), w.narrow(1, rank * k, k),
                                    rank == 0 ? std::optional<at::Tensor>(b) : std::nullopt, group,
                                    /*threshold=*/100);
    for (auto& [name, count] : flashcomm::stats()) {
      if (name == "gemm_rs.pipelined") pipelined[rank] = count;
    }
  });
  for (int r = 0; r < kWorld; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_EQ(outs[r].sizes(), (at::IntArrayRef{c, N}));
  }
  const at::Tensor full = at::cat(outs);
  EXPECT_LT(rel_err(full.narrow(0, 0, n), want), 1e-5);
  EXPECT_TRUE(full.narrow(0, n, kWorld * c - n).eq(0).all().item<bool>());
  // Stats are process-wide: both rank threads count here.
  EXPECT_EQ(pipelined[0] + pipelined[1] > 0, n > 100);
}

// ag_gemm: rank r holds token rows [r*c, r*c+c) and output features slice r;
// with gather_output every rank returns the full [n, N].
TEST_P(CppApi, AgGemmMatchesDense) {
  const int64_t n = GetParam(), K = 32, N = 24, c = ceil_div(n, kWorld);
  at::manual_seed(1);
  const at::Tensor x = at::randn({n, K}), w = at::randn({N, K}), b = at::randn({N});
  const at::Tensor want = at::addmm(b.to(at::kDouble), x.to(at::kDouble), w.to(at::kDouble).t());
  const at::Tensor padded = at::cat({x, at::zeros({kWorld * c - n, K})});
  std::vector<at::Tensor> outs(kWorld);
  const auto errors = run_ranks([&](int rank, const flashcomm::GroupPtr& group) {
    const int64_t nr = N / kWorld;
    outs[rank] = flashcomm::ag_gemm(padded.narrow(0, rank * c, c), w.narrow(0, rank * nr, nr),
                                    b.narrow(0, rank * nr, nr), group, n, /*threshold=*/100,
                                    /*enabled=*/true, /*gather_output=*/true);
  });
  for (int r = 0; r < kWorld; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  for (int r = 0; r < kWorld; ++r) EXPECT_LT(rel_err(outs[r], want), 1e-5) << "rank " << r;
}

// W8A8 with unit scales exposes the int32 accumulator: exact integer GEMM.
TEST_P(CppApi, GemmRsW8A8IsExactWithUnitScales) {
  const int64_t n = GetParam(), K = 64, N = 16;
  at::manual_seed(2);
  const at::Tensor x = at::randint(-128, 128, {n, K}).to(at::kChar);
  const at::Tensor w = at::randint(-128, 128, {N, K}).to(at::kChar);
  const at::Tensor want = at::mm(x.to(at::kDouble), w.to(at::kDouble).t());
  std::vector<at::Tensor> outs(kWorld);
  const auto errors = run_ranks([&](int rank, const flashcomm::GroupPtr& group) {
    const int64_t k = K / kWorld;
    const at::Tensor one = at::ones({1});
    outs[rank] = flashcomm::gemm_rs_w8a8(x.narrow(1, rank * k, k), w.narrow(1, rank * k, k), one,
                                         one, std::nullopt, std::nullopt, group, at::kFloat,
                                         /*threshold=*/100);
  });
  for (int r = 0; r < kWorld; ++r) ASSERT_EQ(errors[r], "") << "rank " << r;
  EXPECT_TRUE(at::equal(at::cat(outs).narrow(0, 0, n).to(at::kDouble), want));
}

// Both sides of the threshold (100), the n < tp corner and an odd count.
INSTANTIATE_TEST_SUITE_P(TokenCounts, CppApi, ::testing::Values(1, 7, 100, 101, 1001));

TEST(CppApiErrors, BadShapeNamesTheArgument) {
  const auto errors = run_ranks([&](int, const flashcomm::GroupPtr& group) {
    flashcomm::gemm_rs(at::randn({4, 8}), at::randn({3, 9}), std::nullopt, group);
  });
  for (const auto& e : errors) EXPECT_NE(e.find("gemm_rs: K mismatch"), std::string::npos) << e;
}

}  // namespace
