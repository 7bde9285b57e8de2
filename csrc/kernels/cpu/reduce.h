// Element-wise sum of several equally shaped buffers (the reduction of the
// host shared-memory collectives). Multi-ISA, see isa.h.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "kernels/cpu/isa.h"

namespace flashcomm::kernels {

// out[i] = srcs[0][i] + srcs[1][i] + ... + srcs[num_srcs - 1][i], i < count,
// elements of `dtype` (float32, bfloat16 or float16; 16-bit types accumulate in
// fp32 and round once). The summation order is srcs[0], srcs[1], ... on every
// call, so ranks that pass their peers in the same order get bitwise-equal sums.
// `out` may alias srcs[0]. `parallel`: over at::parallel_for threads; false: on the
// calling thread alone (a helper thread that must not start a thread team of its own).
using SumFn = void(void* out, const void* const* srcs, int num_srcs, int64_t count,
                   c10::ScalarType dtype, bool parallel);
extern KernelTable<SumFn> sum_kernel;

// True for the dtypes sum_kernel handles.
inline bool sum_supports(c10::ScalarType dtype) {
  return dtype == c10::kFloat || dtype == c10::kBFloat16 || dtype == c10::kHalf;
}

}  // namespace flashcomm::kernels
