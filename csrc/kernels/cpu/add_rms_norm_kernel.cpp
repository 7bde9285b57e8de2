// Compiled once per ISA (see isa.h).

// GCC 12 flags the _mm512_undefined_* idiom of its own AVX512 intrinsic headers
// as -Wmaybe-uninitialized once at::vec's conversions are inlined: a false
// positive, silenced for this file only (it must precede the includes).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/cpu/add_rms_norm.h"

namespace flashcomm::kernels {
namespace CPU_CAPABILITY {

namespace {

using FVec = at::vec::Vectorized<float>;
static_assert(at::vec::Vectorized<c10::BFloat16>::size() == 2 * FVec::size() &&
                  at::vec::Vectorized<c10::Half>::size() == 2 * FVec::size(),
              "a 16-bit vector converts to two fp32 vectors");

// Elements per parallel task (rows are never split): a block of up to this
// many elements runs on the calling thread. One thread does it in about 5 us,
// a few times what waking the OpenMP team costs, so smaller blocks (decode
// batches) don't gain from a second thread.
constexpr int64_t kGrainElements = 16384;

// x86-64's DEFAULT copy (SSE2 only) has no 16-bit vector conversions: at::vec
// converts element by element through memory there, slower than the scalar
// loops, so 16-bit rows run the scalar loops. (AVX2/AVX512, and DEFAULT on
// other architectures, e.g. NEON, convert in vector registers.)
#if defined(CPU_CAPABILITY_DEFAULT) && (defined(__x86_64__) || defined(_M_X64))
constexpr bool kVectorize16Bit = false;
#else
constexpr bool kVectorize16Bit = true;
#endif

// Scalar conversions whose code is the same in every ISA copy. c10::Half's own
// operators compile to F16C instructions under CPU_CAPABILITY_AVX2/AVX512 and
// to integer code otherwise; should the compiler keep an out-of-line copy of
// them, the linker would share one body between the copies, and the DEFAULT
// copy must never run F16C instructions.
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }

template <typename T>
T narrow(float v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(c10::detail::fp16_ieee_from_fp32_value(v), c10::Half::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// Every kernel reads a row twice: pass 1 accumulates sum(s^2) from the inputs,
// pass 2 recomputes s from them and writes residual_out and normed. Recomputing
// s (two loads that hit L1) gives normed the unrounded fp32 s without a scratch
// row, and since only pass 2 writes, each element after its own reads, an
// output may be the very same memory as an input.

template <typename T>
struct Row {
  const T* x;
  const T* residual;  // nullptr without residual
  T* residual_out;
  T* normed;
};

template <typename T>
Row<T> row_at(const AddRmsNormArgs& a, int64_t row) {
  return {static_cast<const T*>(a.x) + row * a.x_row_stride,
          a.residual == nullptr
              ? nullptr
              : static_cast<const T*>(a.residual) + row * a.residual_row_stride,
          static_cast<T*>(a.residual_out) + row * a.residual_out_row_stride,
          static_cast<T*>(a.normed) + row * a.normed_row_stride};
}

float inv_rms(float sum_sq, int64_t hidden, float eps) {
  return 1.0f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
}

// Lanes summed in index order (once per row).
float sum_lanes(const FVec& v) {
  float lanes[FVec::size()];
  v.store(lanes);
  float sum = 0.0f;
  for (int i = 0; i < FVec::size(); ++i) sum += lanes[i];
  return sum;
}

template <typename T, bool kHasResidual>
float s_scalar(const Row<T>& row, int64_t j) {
  float s = widen(row.x[j]);
  if constexpr (kHasResidual) s += widen(row.residual[j]);
  return s;
}

// s of elements [j, j + FVec::size()) (fp32 inputs).
template <bool kHasResidual>
FVec s_float(const Row<float>& row, int64_t j) {
  FVec s = FVec::loadu(row.x + j);
  if constexpr (kHasResidual) s = s + FVec::loadu(row.residual + j);
  return s;
}

// s of elements [j, j + 2 * FVec::size()) as two fp32 halves (16-bit inputs).
template <typename T, bool kHasResidual>
std::pair<FVec, FVec> s_reduced(const Row<T>& row, int64_t j) {
  using RVec = at::vec::Vectorized<T>;
  auto [s0, s1] = at::vec::convert_to_float<T>(RVec::loadu(row.x + j));
  if constexpr (kHasResidual) {
    auto [r0, r1] = at::vec::convert_to_float<T>(RVec::loadu(row.residual + j));
    s0 = s0 + r0;
    s1 = s1 + r1;
  }
  return {s0, s1};
}

// Pass 1: sum(s^2) over the row, two vector accumulators, then the tail.
template <typename T, bool kHasResidual>
float row_sum_squares(const Row<T>& row, int64_t hidden) {
  constexpr int64_t kW = FVec::size();
  FVec acc0(0.0f), acc1(0.0f);
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float> || kVectorize16Bit) {
    for (; j + 2 * kW <= hidden; j += 2 * kW) {
      FVec s0, s1;
      if constexpr (std::is_same_v<T, float>) {
        s0 = s_float<kHasResidual>(row, j);
        s1 = s_float<kHasResidual>(row, j + kW);
      } else {
        std::tie(s0, s1) = s_reduced<T, kHasResidual>(row, j);
      }
      acc0 = at::vec::fmadd(s0, s0, acc0);
      acc1 = at::vec::fmadd(s1, s1, acc1);
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kW <= hidden; j += kW) {
      const FVec s0 = s_float<kHasResidual>(row, j);
      acc0 = at::vec::fmadd(s0, s0, acc0);
    }
  }
  float sum_sq = sum_lanes(acc0 + acc1);
  for (; j < hidden; ++j) {
    const float s = s_scalar<T, kHasResidual>(row, j);
    sum_sq += s * s;
  }
  return sum_sq;
}

// Pass 2 on elements [j, hidden), one at a time (the tail after the vectors).
template <typename T, bool kHasResidual>
void row_outputs_scalar(const Row<T>& row, const T* weight, int64_t j, int64_t hidden,
                        float inv) {
  for (; j < hidden; ++j) {
    const float s = s_scalar<T, kHasResidual>(row, j);
    const float w = widen(weight[j]);
    row.residual_out[j] = narrow<T>(s);
    if constexpr (std::is_same_v<T, float>) {
      row.normed[j] = (s * inv) * w;
    } else {
      row.normed[j] = narrow<T>(widen(narrow<T>(s * inv)) * w);
    }
  }
}

// fp32: residual_out is s itself, so pass 1 writes it and pass 2 reads it back (one
// stream instead of x and residual). Each element is read by pass 1 before its outputs
// are written, so outputs may still be the very memory of the inputs.
template <bool kHasResidual>
void float_rows(const AddRmsNormArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t kW = FVec::size();
  const int64_t hidden = a.hidden;
  const float* weight = static_cast<const float*>(a.weight);
  for (int64_t r = begin; r < end; ++r) {
    const Row<float> row = row_at<float>(a, r);
    FVec acc0(0.0f), acc1(0.0f);
    int64_t j = 0;
    for (; j + 2 * kW <= hidden; j += 2 * kW) {
      const FVec s0 = s_float<kHasResidual>(row, j), s1 = s_float<kHasResidual>(row, j + kW);
      acc0 = at::vec::fmadd(s0, s0, acc0);
      acc1 = at::vec::fmadd(s1, s1, acc1);
      s0.store(row.residual_out + j);
      s1.store(row.residual_out + j + kW);
    }
    for (; j + kW <= hidden; j += kW) {
      const FVec s0 = s_float<kHasResidual>(row, j);
      acc0 = at::vec::fmadd(s0, s0, acc0);
      s0.store(row.residual_out + j);
    }
    float sum_sq = sum_lanes(acc0 + acc1);
    for (; j < hidden; ++j) {
      const float s = s_scalar<float, kHasResidual>(row, j);
      sum_sq += s * s;
      row.residual_out[j] = s;
    }
    const float inv = inv_rms(sum_sq, hidden, a.eps);
    const FVec inv_v(inv);
    for (j = 0; j + kW <= hidden; j += kW) {
      const FVec s = FVec::loadu(row.residual_out + j), w = FVec::loadu(weight + j);
      ((s * inv_v) * w).store(row.normed + j);
    }
    for (; j < hidden; ++j) row.normed[j] = (row.residual_out[j] * inv) * weight[j];
  }
}

// 16-bit rows with at::vec's conversions: fp32 arithmetic, rounded to T where
// ATen's composite rounds (residual_out, s * inv_rms, the product with weight).
template <typename T, bool kHasResidual>
void reduced_rows(const AddRmsNormArgs& a, int64_t begin, int64_t end) {
  using RVec = at::vec::Vectorized<T>;
  constexpr int64_t kW = RVec::size();
  const int64_t hidden = a.hidden;
  const T* weight = static_cast<const T*>(a.weight);
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(a, r);
    const float inv = inv_rms(row_sum_squares<T, kHasResidual>(row, hidden), hidden, a.eps);
    [[maybe_unused]] const FVec inv_v(inv);
    int64_t j = 0;
    if constexpr (kVectorize16Bit) {
      for (; j + kW <= hidden; j += kW) {
        const auto [s0, s1] = s_reduced<T, kHasResidual>(row, j);
        const auto [w0, w1] = at::vec::convert_to_float<T>(RVec::loadu(weight + j));
        at::vec::convert_from_float<T>(s0, s1).store(row.residual_out + j);
        const auto [n0, n1] =
            at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(s0 * inv_v, s1 * inv_v));
        at::vec::convert_from_float<T>(n0 * w0, n1 * w1).store(row.normed + j);
      }
    }
    row_outputs_scalar<T, kHasResidual>(row, weight, j, hidden, inv);
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// bf16 on AVX2, which has no bf16 conversion instruction. at::vec widens bf16 through
// cross-lane permutes and narrows with packs and permutes, so its three roundings per
// element bound the kernel (2-2.5x vLLM's AVX2 kernel, measured). Here nothing crosses a
// lane: 16 bf16 elements widen by a shift and a mask into `even` (lane i = element 2i)
// and `odd` (lane i = element 2i + 1) fp32 vectors, every rounding is integer
// round-to-nearest-even on the fp32 bits (c10::BFloat16's own rule, denormals
// included), and the store puts each odd element's rounded high half next to its even
// neighbour's with a shift and an OR. NaN safety as in the AVX512-BF16 path below: every
// NaN here carries a bf16 payload or x86's default NaN, so the carry never reaches the
// exponent.
struct PairVec8 {
  __m256 even;
  __m256 odd;
};

inline PairVec8 widen_bf16_avx2(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000)))};
}

template <bool kHasResidual>
inline PairVec8 s_pairs_avx2(const Row<c10::BFloat16>& row, int64_t j) {
  PairVec8 s = widen_bf16_avx2(row.x + j);
  if constexpr (kHasResidual) {
    const PairVec8 r = widen_bf16_avx2(row.residual + j);
    s.even = _mm256_add_ps(s.even, r.even);
    s.odd = _mm256_add_ps(s.odd, r.odd);
  }
  return s;
}

// The fp32 bits of f with the bf16 rounding carried into the high half (the low half
// is garbage).
inline __m256i rounded_bits_avx2(__m256 f) {
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
}

inline __m256 round_to_bf16_avx2(__m256 f) {
  return _mm256_castsi256_ps(_mm256_and_si256(rounded_bits_avx2(f), _mm256_set1_epi32(0xFFFF0000)));
}

inline void store_bf16_pairs_avx2(c10::BFloat16* out, __m256 even, __m256 odd) {
  const __m256i lo = _mm256_srli_epi32(rounded_bits_avx2(even), 16);
  const __m256i hi = _mm256_and_si256(rounded_bits_avx2(odd), _mm256_set1_epi32(0xFFFF0000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_or_si256(lo, hi));
}

// Pass 1 also writes residual_out and keeps the unrounded s of the row in fp32 scratch
// (at most 4 x hidden bytes, in L1 for common H), so pass 2 reads s and the weight only:
// each element is read by pass 1 before any output of it is written, so outputs may
// still be the very memory of the inputs.
template <bool kHasResidual>
void bf16_rows_avx2(const AddRmsNormArgs& a, int64_t begin, int64_t end) {
  using T = c10::BFloat16;
  constexpr int64_t kW = 16;  // elements per PairVec8
  const int64_t hidden = a.hidden;
  const int64_t vec_end = hidden - hidden % kW;
  const T* weight = static_cast<const T*>(a.weight);
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < vec_end) scratch.resize(vec_end);
  float* s_even = scratch.data();  // [vec_end / 2] per half, lane order
  float* s_odd = scratch.data() + vec_end / 2;
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(a, r);
    __m256 acc_even = _mm256_setzero_ps(), acc_odd = _mm256_setzero_ps();
    for (int64_t j = 0; j < vec_end; j += kW) {
      const PairVec8 s = s_pairs_avx2<kHasResidual>(row, j);
      acc_even = _mm256_fmadd_ps(s.even, s.even, acc_even);
      acc_odd = _mm256_fmadd_ps(s.odd, s.odd, acc_odd);
      _mm256_storeu_ps(s_even + j / 2, s.even);
      _mm256_storeu_ps(s_odd + j / 2, s.odd);
      store_bf16_pairs_avx2(row.residual_out + j, s.even, s.odd);
    }
    float sum_sq = sum_lanes(FVec(_mm256_add_ps(acc_even, acc_odd)));
    for (int64_t j = vec_end; j < hidden; ++j) {
      const float s = s_scalar<T, kHasResidual>(row, j);
      sum_sq += s * s;
    }

    const float inv = inv_rms(sum_sq, hidden, a.eps);
    const __m256 inv_v = _mm256_set1_ps(inv);
    for (int64_t j = 0; j < vec_end; j += kW) {
      const PairVec8 w = widen_bf16_avx2(weight + j);
      const __m256 scaled_even = round_to_bf16_avx2(_mm256_mul_ps(_mm256_loadu_ps(s_even + j / 2), inv_v));
      const __m256 scaled_odd = round_to_bf16_avx2(_mm256_mul_ps(_mm256_loadu_ps(s_odd + j / 2), inv_v));
      store_bf16_pairs_avx2(row.normed + j, _mm256_mul_ps(scaled_even, w.even),
                            _mm256_mul_ps(scaled_odd, w.odd));
    }
    row_outputs_scalar<T, kHasResidual>(row, weight, vec_end, hidden, inv);
  }
}
#endif  // CPU_CAPABILITY_AVX2

#if defined(CPU_CAPABILITY_AVX512)
// bf16 with the AVX512-BF16 conversion instruction. With AVX512 alone, at::vec
// rounds fp32 to bf16 in about ten integer instructions per vector and widens
// through the shuffle port, which makes the three roundings per element the
// bottleneck; VCVTNE2PS2BF16 rounds 32 values at once. Probed at run time (the
// AVX512 copy also runs on CPUs without it); ONEDNN_MAX_CPU_ISA below
// AVX512_CORE_BF16 turns it off (cpu_has), so tests cover both paths on one machine.
//
// Layout: 32 bf16 elements are widened without shuffles into two fp32 vectors,
// `even` (lane i = element 2i) and `odd` (lane i = element 2i + 1). Everything
// per element is order-free and the sum of squares may be summed in any order,
// so only the final packs put elements back in place.
#define FLASHCOMM_AVX512_BF16_TARGET \
  __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,fma")))

bool avx512_bf16_enabled() {
  static const bool enabled = cpu_has(CpuExt::kAvx512Bf16);
  return enabled;
}

struct PairVec {
  __m512 even;
  __m512 odd;
};

FLASHCOMM_AVX512_BF16_TARGET inline PairVec widen_bf16(const c10::BFloat16* p) {
  const __m512i v = _mm512_loadu_si512(p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF0000)))};
}

template <bool kHasResidual>
FLASHCOMM_AVX512_BF16_TARGET inline PairVec s_pairs(const Row<c10::BFloat16>& row, int64_t j) {
  PairVec s = widen_bf16(row.x + j);
  if constexpr (kHasResidual) {
    const PairVec r = widen_bf16(row.residual + j);
    s.even = _mm512_add_ps(s.even, r.even);
    s.odd = _mm512_add_ps(s.odd, r.odd);
  }
  return s;
}

// f rounded to the nearest-even bf16 value, kept as fp32 (integer rounding, as
// at::vec does; denormals included). NaN safety: every NaN here is a product of
// s, whose NaNs are bf16 NaNs (payload in the high half) or x86's default NaN,
// so the rounding carry never reaches the exponent of a NaN.
FLASHCOMM_AVX512_BF16_TARGET inline __m512 round_to_bf16(__m512 f) {
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_castsi512_ps(_mm512_and_si512(biased, _mm512_set1_epi32(0xFFFF0000)));
}

// Stores 32 elements given as even/odd lanes, rounded to nearest-even bf16
// exactly as at::vec rounds. The instruction treats denormal inputs as zero, so
// a vector holding one is rounded one element at a time instead.
FLASHCOMM_AVX512_BF16_TARGET inline void store_bf16_pairs(c10::BFloat16* out, __m512 even,
                                                          __m512 odd) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  if (C10_UNLIKELY(!_kortestz_mask16_u8(_mm512_fpclass_ps_mask(even, 0x20),
                                         _mm512_fpclass_ps_mask(odd, 0x20)))) {
    alignas(64) float e[16], o[16];
    _mm512_store_ps(e, even);
    _mm512_store_ps(o, odd);
    for (int i = 0; i < 16; ++i) {
      out[2 * i] = narrow<c10::BFloat16>(e[i]);
      out[2 * i + 1] = narrow<c10::BFloat16>(o[i]);
    }
    return;
  }
  // Words 0-15 of `packed` are the even elements, 16-31 the odd ones.
  const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
  _mm512_storeu_si512(out, _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), packed));
}

template <bool kHasResidual>
FLASHCOMM_AVX512_BF16_TARGET void bf16_rows_avx512_bf16(const AddRmsNormArgs& a, int64_t begin,
                                                        int64_t end) {
  using T = c10::BFloat16;
  constexpr int64_t kW = 32;  // elements per PairVec
  const int64_t hidden = a.hidden;
  const T* weight = static_cast<const T*>(a.weight);
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(a, r);
    __m512 acc_even = _mm512_setzero_ps(), acc_odd = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + kW <= hidden; j += kW) {
      const PairVec s = s_pairs<kHasResidual>(row, j);
      acc_even = _mm512_fmadd_ps(s.even, s.even, acc_even);
      acc_odd = _mm512_fmadd_ps(s.odd, s.odd, acc_odd);
    }
    float sum_sq = sum_lanes(FVec(_mm512_add_ps(acc_even, acc_odd)));
    for (; j < hidden; ++j) {
      const float s = s_scalar<T, kHasResidual>(row, j);
      sum_sq += s * s;
    }

    const float inv = inv_rms(sum_sq, hidden, a.eps);
    const __m512 inv_v = _mm512_set1_ps(inv);
    for (j = 0; j + kW <= hidden; j += kW) {
      const PairVec s = s_pairs<kHasResidual>(row, j);
      const PairVec w = widen_bf16(weight + j);
      store_bf16_pairs(row.residual_out + j, s.even, s.odd);
      const __m512 scaled_even = round_to_bf16(_mm512_mul_ps(s.even, inv_v));
      const __m512 scaled_odd = round_to_bf16(_mm512_mul_ps(s.odd, inv_v));
      store_bf16_pairs(row.normed + j, _mm512_mul_ps(scaled_even, w.even),
                       _mm512_mul_ps(scaled_odd, w.odd));
    }
    row_outputs_scalar<T, kHasResidual>(row, weight, j, hidden, inv);
  }
}
#endif  // CPU_CAPABILITY_AVX512

template <typename RowsFn>
void parallel_rows(const AddRmsNormArgs& a, RowsFn rows_fn) {
  const int64_t grain_rows = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, a.hidden));
  at::parallel_for(0, a.rows, grain_rows,
                   [&](int64_t begin, int64_t end) { rows_fn(a, begin, end); });
}

template <bool kHasResidual>
void dispatch_dtype(const AddRmsNormArgs& a) {
  switch (a.dtype) {
    case c10::kFloat:
      parallel_rows(a, float_rows<kHasResidual>);
      break;
    case c10::kBFloat16:
#if defined(CPU_CAPABILITY_AVX512)
      if (avx512_bf16_enabled()) {
        parallel_rows(a, bf16_rows_avx512_bf16<kHasResidual>);
        break;
      }
#endif
#if defined(CPU_CAPABILITY_AVX2)
      parallel_rows(a, bf16_rows_avx2<kHasResidual>);
#else
      parallel_rows(a, reduced_rows<c10::BFloat16, kHasResidual>);
#endif
      break;
    case c10::kHalf:
      parallel_rows(a, reduced_rows<c10::Half, kHasResidual>);
      break;
    default:
      TORCH_CHECK(false, "flashcomm add_rms_norm kernel: unsupported dtype ", a.dtype);
  }
}

}  // namespace

void add_rms_norm_impl(const AddRmsNormArgs& a) {
  if (a.residual != nullptr) {
    dispatch_dtype<true>(a);
  } else {
    dispatch_dtype<false>(a);
  }
}

}  // namespace CPU_CAPABILITY

FLASHCOMM_REGISTER_CPU_KERNEL(add_rms_norm_kernel, CPU_CAPABILITY::add_rms_norm_impl);

}  // namespace flashcomm::kernels
