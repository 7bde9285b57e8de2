#include "ops/weights.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/Utils.h>
#include <c10/core/GradMode.h>
#include <c10/util/intrusive_ptr.h>
#include <flashcomm/weights.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

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

bool cpu_has(const std::unordered_map<std::string, c10::IValue>& caps, const char* feature) {
  const auto it = caps.find(feature);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// Where packing pays (auto mode), per dtype and weight size, on CPUs with native
// instructions for the dtype. Measured on this project's Xeon (AMX-BF16/INT8,
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
bool packing_pays(c10::ScalarType dtype, int64_t numel) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  switch (dtype) {
    case at::kBFloat16:
      return numel >= (int64_t{1} << 15) &&
             (cpu_has(caps, "amx_bf16") || cpu_has(caps, "avx512_bf16"));
    case at::kChar:
      return numel >= (int64_t{1} << 19) &&
             (cpu_has(caps, "amx_int8") || cpu_has(caps, "avx512_vnni") ||
              cpu_has(caps, "avx_vnni"));
    default:
      return false;
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

// Packs a small weight of small integers (exact in every dtype) and checks that
// the packed product equals the exact one.
PackingProbe probe_packing(c10::ScalarType dtype) {
  try {
    if (dtype == at::kBFloat16 && !mkldnn_flag("mkldnn::_is_mkldnn_bf16_supported")) {
      return {false, "oneDNN has no bfloat16 support on this CPU"};
    }
    if (dtype == at::kHalf && !mkldnn_flag("mkldnn::_is_mkldnn_fp16_supported")) {
      return {false, "oneDNN has no float16 support on this CPU"};
    }
    const at::Tensor w64 = at::arange(16 * 40, at::kDouble).reshape({16, 40}).remainder(7).sub(3);
    const at::Tensor x64 = at::arange(3 * 40, at::kDouble).reshape({3, 40}).remainder(5).sub(2);
    const at::Tensor want = at::mm(x64, w64.t());
    const at::Tensor packed = pack(w64.to(dtype));
    if (packed.sizes() != w64.sizes() || packed.scalar_type() != dtype) {
      return {false, "the packed tensor does not report the weight's sizes and dtype"};
    }
    at::Tensor got;
    if (dtype == at::kChar) {
      got = packed_int8_matmul(x64.to(at::kChar), packed);
    } else {
      got = at::empty({3, 16}, at::TensorOptions().dtype(dtype));
      fp_linear_into(x64.to(dtype), packed, std::nullopt, got);
    }
    if (!at::equal(got.to(at::kDouble), want)) return {false, "the packed product is wrong"};
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
      TORCH_CHECK(probe.ok, kOp, ": this CPU cannot pack ", dtype, " weights (", probe.reason,
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
