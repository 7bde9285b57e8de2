// Compiled once per ISA (see isa.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels/cpu/reduce.h"

namespace flashcomm::kernels {
namespace CPU_CAPABILITY {

namespace {

using Vec = at::vec::Vectorized<float>;

// Elements per parallel task: large enough that a task streams a few pages.
constexpr int64_t kGrain = 16384;

// The tails use the vector code with partial loads and stores too: no scalar
// c10::Half / BFloat16 conversion (whose inline definitions differ between the
// ISA copies) is ever emitted here.
void sum_float(float* out, const float* const* srcs, int num_srcs, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), end - i);
    Vec acc = Vec::loadu(srcs[0] + i, count);
    for (int s = 1; s < num_srcs; ++s) acc = acc + Vec::loadu(srcs[s] + i, count);
    acc.store(out + i, count);
  }
}

// 16-bit floats: widen to fp32, sum, round once.
template <typename T>
void sum_reduced(T* out, const T* const* srcs, int num_srcs, int64_t begin, int64_t end) {
  using RVec = at::vec::Vectorized<T>;
  for (int64_t i = begin; i < end; i += RVec::size()) {
    const int64_t count = std::min<int64_t>(RVec::size(), end - i);
    auto [lo, hi] = at::vec::convert_to_float<T>(RVec::loadu(srcs[0] + i, count));
    for (int s = 1; s < num_srcs; ++s) {
      auto [a, b] = at::vec::convert_to_float<T>(RVec::loadu(srcs[s] + i, count));
      lo = lo + a;
      hi = hi + b;
    }
    at::vec::convert_from_float<T>(lo, hi).store(out + i, count);
  }
}

template <typename T, typename Body>
void parallel_sum(void* out, const void* const* srcs, int num_srcs, int64_t count, bool parallel,
                  Body body) {
  T* o = static_cast<T*>(out);
  const T* const* s = reinterpret_cast<const T* const*>(srcs);
  if (!parallel) {
    body(o, s, num_srcs, 0, count);
    return;
  }
  at::parallel_for(0, count, kGrain,
                   [&](int64_t begin, int64_t end) { body(o, s, num_srcs, begin, end); });
}

}  // namespace

void sum_impl(void* out, const void* const* srcs, int num_srcs, int64_t count,
              c10::ScalarType dtype, bool parallel) {
  switch (dtype) {
    case c10::kFloat:
      parallel_sum<float>(out, srcs, num_srcs, count, parallel, sum_float);
      break;
    case c10::kBFloat16:
      parallel_sum<c10::BFloat16>(out, srcs, num_srcs, count, parallel, sum_reduced<c10::BFloat16>);
      break;
    case c10::kHalf:
      parallel_sum<c10::Half>(out, srcs, num_srcs, count, parallel, sum_reduced<c10::Half>);
      break;
    default:
      TORCH_CHECK(false, "flashcomm sum kernel: unsupported dtype ", dtype);
  }
}

}  // namespace CPU_CAPABILITY

FLASHCOMM_REGISTER_CPU_KERNEL(sum_kernel, CPU_CAPABILITY::sum_impl);

}  // namespace flashcomm::kernels
