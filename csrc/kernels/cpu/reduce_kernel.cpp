// Compiled once per ISA (see isa.h).
#include <ATen/Parallel.h>
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

void sum_float(float* out, const float* const* srcs, int num_srcs, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    Vec acc = Vec::loadu(srcs[0] + i);
    for (int s = 1; s < num_srcs; ++s) acc = acc + Vec::loadu(srcs[s] + i);
    acc.store(out + i);
  }
  for (; i < end; ++i) {
    float acc = srcs[0][i];
    for (int s = 1; s < num_srcs; ++s) acc += srcs[s][i];
    out[i] = acc;
  }
}

// 16-bit floats: widen to fp32, sum, round once.
template <typename T>
void sum_reduced(T* out, const T* const* srcs, int num_srcs, int64_t begin, int64_t end) {
  using RVec = at::vec::Vectorized<T>;
  int64_t i = begin;
  for (; i + RVec::size() <= end; i += RVec::size()) {
    auto [lo, hi] = at::vec::convert_to_float<T>(RVec::loadu(srcs[0] + i));
    for (int s = 1; s < num_srcs; ++s) {
      auto [a, b] = at::vec::convert_to_float<T>(RVec::loadu(srcs[s] + i));
      lo = lo + a;
      hi = hi + b;
    }
    at::vec::convert_from_float<T>(lo, hi).store(out + i);
  }
  for (; i < end; ++i) {
    float acc = static_cast<float>(srcs[0][i]);
    for (int s = 1; s < num_srcs; ++s) acc += static_cast<float>(srcs[s][i]);
    out[i] = static_cast<T>(acc);
  }
}

template <typename T, typename Body>
void parallel_sum(void* out, const void* const* srcs, int num_srcs, int64_t count, Body body) {
  T* o = static_cast<T*>(out);
  const T* const* s = reinterpret_cast<const T* const*>(srcs);
  at::parallel_for(0, count, kGrain,
                   [&](int64_t begin, int64_t end) { body(o, s, num_srcs, begin, end); });
}

}  // namespace

void sum_impl(void* out, const void* const* srcs, int num_srcs, int64_t count,
              c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      parallel_sum<float>(out, srcs, num_srcs, count, sum_float);
      break;
    case c10::kBFloat16:
      parallel_sum<c10::BFloat16>(out, srcs, num_srcs, count, sum_reduced<c10::BFloat16>);
      break;
    case c10::kHalf:
      parallel_sum<c10::Half>(out, srcs, num_srcs, count, sum_reduced<c10::Half>);
      break;
    default:
      TORCH_CHECK(false, "flashcomm sum kernel: unsupported dtype ", dtype);
  }
}

}  // namespace CPU_CAPABILITY

FLASHCOMM_REGISTER_CPU_KERNEL(sum_kernel, CPU_CAPABILITY::sum_impl);

}  // namespace flashcomm::kernels
