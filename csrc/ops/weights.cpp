#include "ops/weights.h"

#include "kernels/cpu/isa.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/Utils.h>
#include <c10/core/GradMode.h>
#include <c10/util/intrusive_ptr.h>
#include <flashcomm/weights.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace flashcomm {
namespace ops {

namespace {

// torch's oneDNN ops, reached through the dispatcher (libtorch exports no
// oneDNN symbols). Boxed calls: their C++ signatures are not part of torch's API.
std::optional<c10::OperatorHandle> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""});
}

const std::optional<c10::OperatorHandle>& reorder_linear_weight_op() {
  static const auto op = find_op("mkldnn::_reorder_linear_weight");
  return op;
}
const std::optional<c10::OperatorHandle>& linear_pointwise_op() {
  static const auto op = find_op("mkldnn::_linear_pointwise");
  return op;
}
const std::optional<c10::OperatorHandle>& qlinear_prepack_op() {
  static const auto op = find_op("onednn::qlinear_prepack");
  return op;
}
const std::optional<c10::OperatorHandle>& qlinear_pointwise_op() {
  static const auto op = find_op("onednn::qlinear_pointwise");
  return op;
}

c10::IValue call_one(const std::optional<c10::OperatorHandle>& op, const char* name,
                     torch::jit::Stack stack) {
  TORCH_CHECK(op.has_value(), "flashcomm: this torch build has no ", name);
  op->callBoxed(&stack);
  return std::move(stack.at(0));
}

bool mkldnn_flag(const char* name) {
  const auto op = find_op(name);
  if (!op.has_value()) return false;
  return call_one(op, name, {}).toBool();
}

// Where packing pays (auto mode), per dtype and weight size, on CPUs whose native
// instructions for the dtype oneDNN may use (kernels::cpu_has honours
// ONEDNN_MAX_CPU_ISA). Measured on this project's Xeon (AMX-BF16/INT8,
// AVX512-BF16/FP16/VNNI), 1 thread, benchmarks/kernel_bench.py (rough: shared box):
//   bf16: packed (oneDNN, AMX) 0.15-0.8x at::mm's time for n <= 128, equal above;
//         but it costs ~15-20 us of oneDNN set-up per call, so below N*K = 32K
//         (e.g. 64 x 64, n = 1: 19 us vs 3 us) at::mm stays;
//   int8: qlinear_pointwise 0.2-0.6x at::_int_mm's time for n >= 128 and 0.5-0.8x at
//         decode sizes on 512 x 1536 and up, but ~25 us of set-up per call makes it
//         slower than _int_mm at small n below N*K = 512K (512 x 512, n = 16: 28 us
//         vs 16 us);
//   fp32: packed 0.55x at n = 8, 1.3x at n = 1 (set-up), equal from n = 64: kept plain;
//   fp16: no gain either way here (no AMX-FP16): kept plain.
// Without VNNI or AMX, int8 is never packed by default: oneDNN's int8 GEMM there sums
// u8 x s8 pairs in saturating 16-bit lanes (the probe below refuses it).
bool packing_pays(c10::ScalarType dtype, int64_t numel) {
  using kernels::CpuExt;
  using kernels::cpu_has;
  switch (dtype) {
    case at::kBFloat16:
      return numel >= (int64_t{1} << 15) &&
             (cpu_has(CpuExt::kAmxBf16) || cpu_has(CpuExt::kAvx512Bf16));
    case at::kChar:
      return numel >= (int64_t{1} << 19) &&
             (cpu_has(CpuExt::kAmxInt8) || cpu_has(CpuExt::kAvx512Vnni) ||
              cpu_has(CpuExt::kAvxVnni));
    default:
      return false;
  }
}

// The name users write (torch.int8, not c10's "Char").
const char* dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kChar:
      return "int8";
    default:
      return c10::toString(dtype);
  }
}

bool packable_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
         dtype == at::kChar;
}

at::Tensor pack_float(const at::Tensor& weight) {
  return call_one(reorder_linear_weight_op(), "mkldnn::_reorder_linear_weight",
                  {weight.contiguous(), c10::IValue()})
      .toTensor();
}

at::Tensor pack_int8(const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor packed = call_one(qlinear_prepack_op(), "onednn::qlinear_prepack",
                               {weight.contiguous(), c10::IValue()})
                          .toTensor();
  // torch reports the packed tensor as W^T [K, N]; the ops need [N, K]. Only the
  // reported metadata changes (as_reported_by_torch restores it for torch's calls).
  const int64_t sizes[] = {N, K};
  const int64_t strides[] = {K, 1};
  packed.unsafeGetTensorImpl()->set_sizes_and_strides(c10::IntArrayRef(sizes),
                                                      c10::IntArrayRef(strides));
  return packed;
}

// A packed int8 weight as torch itself reports it, [K, N]: a shallow copy (same
// oneDNN tensor) for the duration of a call, since qlinear_pointwise reads N from
// the reported sizes.
at::Tensor as_reported_by_torch(const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1);
  c10::intrusive_ptr<c10::TensorImpl> impl = weight.unsafeGetTensorImpl()->shallow_copy_and_detach(
      c10::VariableVersion(/*version=*/0), /*allow_tensor_metadata_change=*/true);
  const int64_t sizes[] = {K, N};
  const int64_t strides[] = {N, 1};
  impl->set_sizes_and_strides(c10::IntArrayRef(sizes), c10::IntArrayRef(strides));
  return at::Tensor(std::move(impl));
}

at::Tensor pack(const at::Tensor& weight) {
  at::NoGradGuard no_grad;
  return weight.scalar_type() == at::kChar ? pack_int8(weight) : pack_float(weight);
}

// Whether this CPU packs weights of one dtype; `reason` says why not.
struct PackingProbe {
  bool ok = false;
  std::string reason;
};

// Worst-case operands of one dtype: integers with every mantissa bit of the dtype in
// use, so that any rounding of an input (e.g. fp32 computed in bf16) or any partial sum
// kept in a narrower accumulator than the contract's shows.
struct ProbeMagnitudes {
  int64_t x_max;  // |x| <= x_max, exact in the dtype
  int64_t w_max;  // |w| <= w_max
  int64_t half_k;  // K = 2 * half_k + 1
};

ProbeMagnitudes probe_magnitudes(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kChar:  // int32 accumulation: K = 4097 at full range, as in a real layer
      return {127, 128, 2048};
    case at::kBFloat16:  // 8 significant bits; every partial sum exact in fp32
      return {255, 255, 128};
    case at::kHalf:  // 11 bits; the products fit fp16, the partial sums do not
      return {2047, 15, 256};
    default:  // fp32: 12 bits (more than bf16's 8 or tf32's 11)
      return {4095, 15, 128};
  }
}

}  // namespace

// Each row's second half negates its first half, so partial sums grow to K/2 * |x| * |w|
// and the total comes back to the product of the last column; for int8 the weights hold
// +127 / -128 runs against x = 127 (u8 255 after oneDNN's s8 -> u8 shift) and a row of
// full-range values.
std::pair<at::Tensor, at::Tensor> worst_case_operands(c10::ScalarType dtype) {
  const ProbeMagnitudes mag = probe_magnitudes(dtype);
  const int64_t K = 2 * mag.half_k + 1;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor k = at::arange(mag.half_k, f64);
  // Integers in [max - max/2, max], spread over the range.
  const auto spread = [&](int64_t max, int64_t salt) {
    return (k.mul(37).add(salt).remainder(max / 2 + 1)).add(max - max / 2);
  };
  const auto halves = [&](const at::Tensor& first, double last) {
    return at::cat({first, first.neg(), at::full({1}, last, f64)});
  };
  std::vector<at::Tensor> x_rows, w_rows;
  for (int64_t i = 0; i < 3; ++i) {
    x_rows.push_back(halves(spread(mag.x_max, 11 * i), static_cast<double>(i + 1)));
  }
  for (int64_t n = 0; n < 16; ++n) {
    // int8: runs of four equal values, so every adjacent pair a 16-bit pair sum adds
    // holds two equal extremes.
    at::Tensor first = dtype == at::kChar
                           ? at::where(k.div(4).floor().add(n).remainder(2).eq(0), 127.0,
                                       -128.0)
                           : spread(mag.w_max, 7 * n).mul(n % 2 == 0 ? 1 : -1);
    w_rows.push_back(at::cat({first, first, at::full({1}, static_cast<double>(n - 8), f64)}));
  }
  at::Tensor x = at::stack(x_rows);
  if (dtype == at::kChar) {
    // All 127 (u8 255 after the shift, the worst case) and a full-range row.
    x[0].fill_(127);
    x[1] = at::arange(K, f64).mul(97).remainder(256).sub(128);
  }
  // Row 3: the first half at +max only, unbalanced (a large, exactly representable total
  // for int8's int32 accumulator; for floats scaled down to keep the total exact).
  at::Tensor last = at::cat({spread(mag.x_max, 5), at::zeros({mag.half_k + 1}, f64)});
  if (dtype != at::kChar) last = last.div(mag.x_max).floor();
  x = at::cat({x, last.unsqueeze(0)});
  return {x, at::stack(w_rows)};
}

namespace {

// Packs a weight of worst-case integers and checks that the packed product equals the
// exact one, rounded once to the output dtype.
PackingProbe probe_packing(c10::ScalarType dtype) {
  try {
    if (dtype == at::kBFloat16 && !mkldnn_flag("mkldnn::_is_mkldnn_bf16_supported")) {
      return {false, "oneDNN has no bfloat16 support on this CPU"};
    }
    if (dtype == at::kHalf && !mkldnn_flag("mkldnn::_is_mkldnn_fp16_supported")) {
      return {false, "oneDNN has no float16 support on this CPU"};
    }
    const auto [x64, w64] = worst_case_operands(dtype);
    const at::Tensor exact = at::mm(x64, w64.t());  // every partial sum < 2^53: exact
    const at::Tensor packed = pack(w64.to(dtype));
    if (packed.sizes() != w64.sizes() || packed.scalar_type() != dtype) {
      return {false, "the packed tensor does not report the weight's sizes and dtype"};
    }
    at::Tensor got, want;
    if (dtype == at::kChar) {
      got = packed_int8_matmul(x64.to(at::kChar), packed);
      want = exact.to(at::kFloat);  // the int32 accumulator converted once
    } else {
      got = at::empty({x64.size(0), w64.size(0)}, at::TensorOptions().dtype(dtype));
      fp_linear_into(x64.to(dtype), packed, std::nullopt, got);
      want = exact.to(dtype);
    }
    if (!at::equal(got, want)) {
      const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
      std::string why = std::string("oneDNN's packed ") + dtype_name(dtype) +
                        " GEMM is not exact on this CPU at worst-case values (max error " +
                        std::to_string(err) + " at K = " + std::to_string(x64.size(1)) + ")";
      if (dtype == at::kChar) {
        why += "; without VNNI or AMX it sums u8 x s8 pairs in saturating 16-bit lanes";
      }
      return {false, why};
    }
    return {true, ""};
  } catch (const std::exception& e) {
    return {false, e.what()};
  }
}

// Row sums, keyed by TensorImpl address. An entry's weak reference keeps that
// address from being reused while the entry exists, so a live entry under a key
// is that very TensorImpl.
class RowSumCache {
 public:
  at::Tensor get(const at::Tensor& weight) {
    const bool packed = weight_format(weight) != WeightFormat::kPlain;
    if (!packed && weight.is_inference()) return compute(weight);
    c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
    // A plain weight's in-place writes bump its version; a swap of its storage
    // (`w.data = ...`) changes its data pointer.
    const int64_t version = packed ? 0 : impl->version_counter().current_version();
    const void* data = packed ? nullptr : weight.const_data_ptr();
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = entries_.find(impl);
      if (it != entries_.end() && !it->second.impl.expired() && it->second.version == version &&
          it->second.data == data) {
        return it->second.sums;
      }
    }
    at::Tensor sums = compute(weight);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.impl.expired() ? entries_.erase(it) : std::next(it);
    }
    entries_.insert_or_assign(impl,
                              Entry{WeakImpl(weight.getIntrusivePtr()), version, data, sums});
    return sums;
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    WeakImpl impl;
    int64_t version;
    const void* data;
    at::Tensor sums;
  };

  static at::Tensor compute(const at::Tensor& weight) {
    at::NoGradGuard no_grad;
    if (weight_format(weight) == WeightFormat::kPackedInt8) {
      // One row of ones through the packed GEMM gives sum_k W[n, k] exactly.
      const at::Tensor ones = at::ones({1, weight.size(1)}, weight.options().dtype(at::kChar)
                                                               .layout(at::kStrided));
      return packed_int8_matmul(ones, weight).reshape({-1});
    }
    return weight.sum(/*dim=*/1, /*keepdim=*/false, at::kInt).to(at::kFloat);
  }

  std::mutex mu_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

}  // namespace

WeightFormat weight_format(const at::Tensor& weight) {
  if (!weight.is_mkldnn()) return WeightFormat::kPlain;
  return weight.scalar_type() == at::kChar ? WeightFormat::kPackedInt8
                                           : WeightFormat::kPackedFloat;
}

void fp_linear_into(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, at::Tensor& out) {
  if (weight_format(weight) == WeightFormat::kPlain) {
    if (bias.has_value()) {
      at::addmm_out(out, *bias, x, weight.t());
    } else {
      at::mm_out(out, x, weight.t());
    }
    return;
  }
  if (x.size(0) == 0) return;
  // No out= variant: the product lands in a new tensor, copied into `out`
  // (a row-contiguous pass over [m, N], small against the GEMM).
  const at::Tensor y =
      call_one(linear_pointwise_op(), "mkldnn::_linear_pointwise",
               {x, weight, bias.has_value() ? c10::IValue(*bias) : c10::IValue(),
                std::string("none"), c10::List<std::optional<at::Scalar>>(), std::string("")})
          .toTensor();
  out.copy_(y);
}

at::Tensor packed_int8_matmul(const at::Tensor& q, const at::Tensor& weight) {
  const int64_t N = weight.size(0);
  // Unit scales and zero points: the fp32 output is the int32 accumulator,
  // converted once (exact below 2^24, rounded to nearest above, like .to(float)).
  const at::Tensor unit_scale = at::ones({N}, q.options().dtype(at::kFloat));
  const at::Tensor zero_zp = at::zeros({N}, q.options().dtype(at::kLong));
  return call_one(qlinear_pointwise_op(), "onednn::qlinear_pointwise",
                  {q, 1.0, int64_t{0}, as_reported_by_torch(weight), unit_scale, zero_zp,
                   c10::IValue(), 1.0, int64_t{0}, c10::IValue(at::kFloat), std::string("none"),
                   c10::List<std::optional<at::Scalar>>(), std::string("")})
      .toTensor();
}

at::Tensor weight_row_sums(const at::Tensor& weight) {
  static RowSumCache cache;
  return cache.get(weight);
}

namespace {

// Probed once per dtype, on first use.
const PackingProbe& packing_probe(c10::ScalarType dtype) {
  static const PackingProbe kUnsupported{false, "only float32, bfloat16, float16 and int8 pack"};
  switch (dtype) {
    case at::kFloat: {
      static const PackingProbe probe = probe_packing(at::kFloat);
      return probe;
    }
    case at::kBFloat16: {
      static const PackingProbe probe = probe_packing(at::kBFloat16);
      return probe;
    }
    case at::kHalf: {
      static const PackingProbe probe = probe_packing(at::kHalf);
      return probe;
    }
    case at::kChar: {
      static const PackingProbe probe = probe_packing(at::kChar);
      return probe;
    }
    default:
      return kUnsupported;
  }
}

}  // namespace
}  // namespace ops

bool weight_packing_supported(c10::ScalarType dtype) { return ops::packing_probe(dtype).ok; }

bool weight_packed_by_default(c10::ScalarType dtype, int64_t N, int64_t K) {
  return N > 0 && K > 0 && ops::packing_pays(dtype, N * K) && ops::packing_probe(dtype).ok;
}

bool is_packed_weight(const at::Tensor& weight) {
  return ops::weight_format(weight) != ops::WeightFormat::kPlain;
}

at::Tensor prepare_linear_weight(const at::Tensor& weight, std::optional<bool> pack) {
  constexpr const char* kOp = "prepare_linear_weight";
  if (is_packed_weight(weight)) return weight;
  TORCH_CHECK(weight.dim() == 2, kOp, ": weight must be 2-D [N, K], got sizes ", weight.sizes());
  TORCH_CHECK(ops::packable_dtype(weight.scalar_type()), kOp,
              ": weight must be float32, bfloat16, float16 or int8, got ", weight.scalar_type());
  const c10::ScalarType dtype = weight.scalar_type();
  bool packed = false;
  if (pack.value_or(true) && weight.device().is_cpu() && weight.numel() > 0) {
    if (pack.has_value()) {
      const ops::PackingProbe& probe = ops::packing_probe(dtype);
      TORCH_CHECK(probe.ok, kOp, ": this CPU cannot pack ", ops::dtype_name(dtype), " weights (",
                  probe.reason,
                  "); pass pack=None to fall back to the plain weight");
      packed = true;
    } else {
      packed = weight_packed_by_default(dtype, weight.size(0), weight.size(1));
    }
  }
  // Plain: contiguous, as the int8 GEMMs (CUDA _int_mm) want W^T column-major.
  return packed ? ops::pack(weight) : weight.contiguous();
}

}  // namespace flashcomm
