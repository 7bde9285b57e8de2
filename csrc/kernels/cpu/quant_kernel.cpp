// Compiled once per ISA (see isa.h).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/quant.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

// GCC 12 flags the AVX-512 intrinsics' own undefined pass-through operands as
// maybe-uninitialized once they are inlined here: a known false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace flashcomm::kernels {
namespace CPU_CAPABILITY {

namespace {

using FVec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kW = FVec::size();

// Elements per parallel task: below this a block runs on the calling thread,
// since waking the OpenMP team costs more than the work.
constexpr int64_t kGrainElements = 32768;

int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
}

// Hides `v` from the optimiser so that a product feeding an addition is never
// contracted into a fused multiply-add (gnu++17 allows contraction, and only the
// FMA-capable ISA copies could do it): every variant then rounds each step as
// the ATen composition does, and all variants agree bitwise.
template <typename T>
T no_contract(T v) {
#if defined(__x86_64__) && (defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2))
  __asm__("" : "+x"(v));
#endif
  return v;
}

FVec no_contract(const FVec& v) {
#if defined(__x86_64__) && defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  __asm__("" : "+v"(r));
  return FVec(r);
#elif defined(__x86_64__) && defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  __asm__("" : "+x"(r));
  return FVec(r);
#else
  return v;
#endif
}

// Calls body(j, FVec) for each full vector of the row's first K values converted
// to fp32, then tail(j, float) for each remaining value.
template <typename T, typename Body, typename Tail>
void for_each_float(const T* row, int64_t K, Body body, Tail tail) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kW <= K; j += kW) body(j, FVec::loadu(row + j));
  } else {
    using RVec = at::vec::Vectorized<T>;
    for (; j + RVec::size() <= K; j += RVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(RVec::loadu(row + j));
      body(j, lo);
      body(j + kW, hi);
    }
  }
  for (; j < K; ++j) tail(j, static_cast<float>(row[j]));
}

// v: integral values in [-128, 127] (already rounded, clamped, NaN-free).
void store_int8(int8_t* dst, const FVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i i32 = _mm256_cvtps_epi32(v);
  const __m128i i16 =
      _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(i16, i16));
#else
  float lanes[kW];
  v.store(lanes);
  for (int64_t i = 0; i < kW; ++i) dst[i] = static_cast<int8_t>(lanes[i]);
#endif
}

// NaN -> 0, then clamp to [lo, hi] (infinities saturate).
FVec saturate(const FVec& v, const FVec& lo, const FVec& hi) {
  const FVec finite_or_inf = FVec::blendv(FVec(0.0f), v, v == v);
  return at::vec::minimum(at::vec::maximum(finite_or_inf, lo), hi);
}

int8_t saturate(float v, float lo, float hi) {
  if (std::isnan(v)) return 0;
  return static_cast<int8_t>(std::min(std::max(v, lo), hi));
}

template <typename T>
void quantize_dynamic_rows(const FloatRows& x, int64_t begin, int64_t end, int64_t K,
                           const Int8Rows& dst) {
  const FVec lo(-127.0f), hi(127.0f);
  for (int64_t r = begin; r < end; ++r) {
    const T* row = static_cast<const T*>(x.data) + r * x.row_stride;
    // absmax, NaN-propagating: at::vec::maximum returns NaN if either input is.
    FVec vmax(0.0f);
    float smax = 0.0f;
    bool nan = false;
    for_each_float(
        row, K, [&](int64_t, const FVec& v) { vmax = at::vec::maximum(vmax, v.abs()); },
        [&](int64_t, float v) {
          nan |= std::isnan(v);
          smax = std::max(smax, std::abs(v));
        });
    float lanes[kW];
    vmax.store(lanes);
    for (int64_t i = 0; i < kW; ++i) {
      nan |= std::isnan(lanes[i]);
      smax = std::max(smax, lanes[i]);
    }
    const float absmax = nan ? std::numeric_limits<float>::quiet_NaN() : smax;
    const float scale = absmax / 127.0f;
    const float safe = scale == 0.0f ? 1.0f : scale;
    std::memcpy(dst.scale + r * dst.scale_row_stride, &scale, sizeof(float));

    int8_t* q = dst.q + r * dst.q_row_stride;
    const FVec vsafe(safe);
    for_each_float(
        row, K,
        [&](int64_t j, const FVec& v) {
          store_int8(q + j, saturate((v / vsafe).round(), lo, hi));
        },
        [&](int64_t j, float v) { q[j] = saturate(std::nearbyint(v / safe), -127.0f, 127.0f); });
  }
}

template <typename T>
void quantize_static_rows(const FloatRows& x, int64_t begin, int64_t end, int64_t K, float scale,
                          int32_t zero_point, const Int8Rows& dst) {
  const FVec lo(-128.0f), hi(127.0f), vscale(scale);
  const float zp = static_cast<float>(zero_point);
  const FVec vzp(zp);
  for (int64_t r = begin; r < end; ++r) {
    const T* row = static_cast<const T*>(x.data) + r * x.row_stride;
    int8_t* q = dst.q + r * dst.q_row_stride;
    for_each_float(
        row, K,
        [&](int64_t j, const FVec& v) {
          store_int8(q + j, saturate((v / vscale).round() + vzp, lo, hi));
        },
        [&](int64_t j, float v) {
          q[j] = saturate(std::nearbyint(v / scale) + zp, -128.0f, 127.0f);
        });
  }
}

template <typename Fn>
void dispatch_float_rows(c10::ScalarType dtype, const char* what, Fn fn) {
  switch (dtype) {
    case c10::kFloat:
      fn(float{});
      break;
    case c10::kBFloat16:
      fn(c10::BFloat16{});
      break;
    case c10::kHalf:
      fn(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "flashcomm ", what, " kernel: unsupported dtype ", dtype);
  }
}

// ---------------------------------------------------------------------------
// Dequantisation.

template <typename Acc>
FVec load_acc(const Acc* p) {
  if constexpr (std::is_same_v<Acc, float>) {
    return FVec::loadu(p);
  } else {
    return at::vec::convert_to_fp_of_same_size<float>(IVec::loadu(p));
  }
}

// The fp32 value of output column j of a row whose x scale is xs.
struct Epilogue {
  const DequantArgs& a;
  FVec vector(FVec y, const FVec& xs, int64_t j) const {
    if (a.zp_correction != nullptr) y = y - FVec::loadu(a.zp_correction + j);
    y = y * xs;
    y = y * (a.w_scale_per_channel ? FVec::loadu(a.w_scale + j) : FVec(a.w_scale[0]));
    if (a.bias != nullptr) y = no_contract(y) + FVec::loadu(a.bias + j);
    return y;
  }
  float scalar(float y, float xs, int64_t j) const {
    if (a.zp_correction != nullptr) y = y - a.zp_correction[j];
    y = y * xs;
    y = y * (a.w_scale_per_channel ? a.w_scale[j] : a.w_scale[0]);
    if (a.bias != nullptr) y = no_contract(y) + a.bias[j];
    return y;
  }
};

template <typename Acc, typename Out>
void dequantize_rows(const DequantArgs& a, int64_t begin, int64_t end, int64_t N) {
  const Epilogue epi{a};
  for (int64_t r = begin; r < end; ++r) {
    const Acc* acc = static_cast<const Acc*>(a.acc) + r * a.acc_row_stride;
    Out* out = static_cast<Out*>(a.out) + r * a.out_row_stride;
    float xs;
    std::memcpy(&xs, a.x_scale + r * a.x_scale_row_stride, sizeof(float));
    const FVec vxs(xs);
    int64_t j = 0;
    if constexpr (std::is_same_v<Out, float>) {
      for (; j + kW <= N; j += kW) epi.vector(load_acc(acc + j), vxs, j).store(out + j);
    } else {
      for (; j + 2 * kW <= N; j += 2 * kW) {
        const FVec y0 = epi.vector(load_acc(acc + j), vxs, j);
        const FVec y1 = epi.vector(load_acc(acc + j + kW), vxs, j + kW);
        at::vec::convert_from_float<Out>(y0, y1).store(out + j);
      }
    }
    for (; j < N; ++j) out[j] = static_cast<Out>(epi.scalar(static_cast<float>(acc[j]), xs, j));
  }
}

template <typename Acc>
void dequantize_acc(const DequantArgs& a, int64_t rows, int64_t N) {
  auto run = [&](auto out_tag) {
    using Out = decltype(out_tag);
    at::parallel_for(0, rows, grain_rows(N), [&](int64_t begin, int64_t end) {
      dequantize_rows<Acc, Out>(a, begin, end, N);
    });
  };
  dispatch_float_rows(a.out_dtype, "dequantize", run);
}

}  // namespace

void quantize_dynamic_impl(const FloatRows& x, int64_t rows, int64_t K, const Int8Rows& dst) {
  dispatch_float_rows(x.dtype, "quantize_dynamic", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows, grain_rows(K), [&](int64_t begin, int64_t end) {
      quantize_dynamic_rows<T>(x, begin, end, K, dst);
    });
  });
}

void quantize_static_impl(const FloatRows& x, int64_t rows, int64_t K, float scale,
                          int32_t zero_point, const Int8Rows& dst) {
  dispatch_float_rows(x.dtype, "quantize_static", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows, grain_rows(K), [&](int64_t begin, int64_t end) {
      quantize_static_rows<T>(x, begin, end, K, scale, zero_point, dst);
    });
  });
}

void dequantize_impl(const DequantArgs& args, int64_t rows, int64_t N) {
  if (args.acc_dtype == c10::kInt) {
    dequantize_acc<int32_t>(args, rows, N);
  } else {
    TORCH_CHECK(args.acc_dtype == c10::kFloat, "flashcomm dequantize kernel: accumulators must ",
                "be int32 or float32, got ", args.acc_dtype);
    dequantize_acc<float>(args, rows, N);
  }
}

}  // namespace CPU_CAPABILITY

FLASHCOMM_REGISTER_CPU_KERNEL(quantize_dynamic_kernel, CPU_CAPABILITY::quantize_dynamic_impl);
FLASHCOMM_REGISTER_CPU_KERNEL(quantize_static_kernel, CPU_CAPABILITY::quantize_static_impl);
FLASHCOMM_REGISTER_CPU_KERNEL(dequantize_kernel, CPU_CAPABILITY::dequantize_impl);

}  // namespace flashcomm::kernels
