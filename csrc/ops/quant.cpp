#include "ops/quant.h"

#include <cstring>

#include "kernels/cpu/quant.h"
#include "ops/weights.h"

namespace flashcomm {
namespace kernels {

// Tables of the multi-ISA W8A8 kernels (entries registered by quant_kernel.cpp).
KernelTable<QuantizeDynamicFn> quantize_dynamic_kernel;
KernelTable<QuantizeStaticFn> quantize_static_kernel;
KernelTable<DequantizeFn> dequantize_kernel;

}  // namespace kernels

namespace ops {

namespace {

// `v` already rounded. NaN has no int8 value: it maps to 0 (for dynamic
// quantisation its row keeps a NaN scale, so the NaN still reaches the output).
at::Tensor saturate_to_int8(const at::Tensor& v, double lo, double hi) {
  return at::clamp(at::nan_to_num(v, 0.0, hi, lo), lo, hi).to(at::kChar);
}

// The ATen composition of the quantisation (non-CPU devices).
QuantizedActivation quantize_static_aten(const at::Tensor& x, const at::Tensor& scale,
                                         const at::Tensor& zero_point) {
  at::Tensor v = at::round(x.to(at::kFloat) / scale);
  if (zero_point.defined()) v = v + zero_point.reshape({1}).to(at::kFloat);
  return {saturate_to_int8(v, -128.0, 127.0), scale};
}

QuantizedActivation quantize_dynamic_aten(const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor absmax = xf.abs().amax(/*dim=*/1, /*keepdim=*/true);  // [rows, 1]
  if (xf.size(0) > 0) {
    // amax drops NaN on some backends; make a row containing NaN keep a NaN scale.
    absmax = at::where(xf.isnan().any(1, true), at::full_like(absmax, NAN), absmax);
  }
  // True division on every device. ATen's CUDA kernel divides by a CPU scalar as a
  // multiplication by its reciprocal, 1 ulp off absmax / 127 for some values, enough to
  // flip a quantised value at a .5 boundary; a divisor tensor on the device divides.
  // The CPU keeps the scalar form (true division there, bitwise what the CPU kernels give).
  at::Tensor scale = absmax.device().is_cpu()
                         ? absmax / 127.0
                         : absmax / at::scalar_tensor(127.0, absmax.options());
  at::Tensor safe = at::where(scale == 0, at::ones_like(scale), scale);
  return {saturate_to_int8(at::round(xf / safe), -127.0, 127.0), scale};
}

bool cpu_kernels_apply(const at::Tensor& x) {
  return x.device().is_cpu() && kernels::quant_supports(x.scalar_type());
}

kernels::FloatRows float_rows(const at::Tensor& x) {
  return {x.const_data_ptr(), x.stride(0), x.scalar_type()};
}

}  // namespace

ActivationQuantizer::ActivationQuantizer(const at::Tensor& x,
                                         const std::optional<at::Tensor>& input_scale,
                                         const std::optional<at::Tensor>& input_zero_point)
    : x_(x.size(1) > 0 && x.stride(1) != 1 ? x.contiguous() : x) {
  if (input_zero_point.has_value()) zero_point_ = input_zero_point->reshape({1});
  if (x.scalar_type() == at::kChar) {
    const at::Tensor& s = *input_scale;
    mode_ = s.dim() == 2 ? Mode::kInt8PerToken : Mode::kInt8PerTensor;
    scale_ = s.dim() == 2 ? s : s.reshape({1});
    return;
  }
  if (!input_scale.has_value()) {
    mode_ = Mode::kDynamic;
    return;
  }
  mode_ = Mode::kStatic;
  scale_ = input_scale->reshape({1});
  if (cpu_kernels_apply(x_)) {
    static_scale_ = scale_.item<float>();
    if (zero_point_.defined()) static_zero_point_ = zero_point_.item<int32_t>();
  }
}

QuantizedActivation ActivationQuantizer::quantize(int64_t begin, int64_t count) const {
  const at::Tensor rows = x_.narrow(0, begin, count);
  switch (mode_) {
    case Mode::kInt8PerTensor:
      return {rows, scale_};
    case Mode::kInt8PerToken:
      return {rows, scale_.narrow(0, begin, count)};
    case Mode::kStatic: {
      if (!cpu_kernels_apply(rows)) return quantize_static_aten(rows, scale_, zero_point_);
      at::Tensor q = at::empty({count, cols()}, rows.options().dtype(at::kChar));
      if (count > 0) {
        kernels::quantize_static_kernel.get()(
            float_rows(rows), count, cols(), static_scale_, static_zero_point_,
            {q.mutable_data_ptr<int8_t>(), q.stride(0), nullptr, 0});
      }
      return {q, scale_};
    }
    case Mode::kDynamic:
    default: {
      if (!cpu_kernels_apply(rows)) return quantize_dynamic_aten(rows);
      at::Tensor q = at::empty({count, cols()}, rows.options().dtype(at::kChar));
      at::Tensor scale = at::empty({count, 1}, rows.options().dtype(at::kFloat));
      if (count > 0) {
        kernels::quantize_dynamic_kernel.get()(
            float_rows(rows), count, cols(),
            {q.mutable_data_ptr<int8_t>(), q.stride(0),
             static_cast<char*>(scale.mutable_data_ptr()), sizeof(float)});
      }
      return {q, scale};
    }
  }
}

void ActivationQuantizer::write_payload(int64_t begin, int64_t count, at::Tensor& dst) const {
  if (count == 0) return;
  const int64_t K = cols();
  const at::Tensor rows = x_.narrow(0, begin, count);
  const bool direct = dst.device().is_cpu() && dst.stride(1) == 1 &&
                      (mode_ == Mode::kDynamic || mode_ == Mode::kStatic) &&
                      cpu_kernels_apply(rows);
  if (direct) {
    // Quantise straight into the destination rows (a transport slot, say).
    int8_t* q = dst.mutable_data_ptr<int8_t>();
    const kernels::Int8Rows out{q, dst.stride(0), reinterpret_cast<char*>(q) + K, dst.stride(0)};
    if (mode_ == Mode::kDynamic) {
      kernels::quantize_dynamic_kernel.get()(float_rows(rows), count, K, out);
    } else {
      kernels::quantize_static_kernel.get()(float_rows(rows), count, K, static_scale_,
                                            static_zero_point_, out);
    }
    return;
  }
  const QuantizedActivation qx = quantize(begin, count);
  dst.narrow(1, 0, K).copy_(qx.q);
  if (per_token()) {
    // Flatten first: a [rows, 1] tensor may carry any stride in its size-1 dim.
    const at::Tensor bytes =
        qx.scale.reshape({-1}).contiguous().view(at::kChar).view({count, 4});
    dst.narrow(1, K, 4).copy_(bytes);
  }
}

namespace {

// Whether at::_int_mm is exact on this CPU. torch runs it through oneDNN, whose int8
// GEMM on a CPU without VNNI or AMX (or with ONEDNN_MAX_CPU_ISA below them) may sum
// u8 x s8 pairs in saturating 16-bit lanes; there the exact fallback below runs.
// Probed once per process on the worst-case operands.
bool cpu_int_mm_exact() {
  static const bool exact = [] {
    try {
      const auto [x64, w64] = worst_case_operands(at::kChar);
      const at::Tensor got = at::_int_mm(x64.to(at::kChar), w64.to(at::kChar).t());
      return at::equal(got.to(at::kLong), at::mm(x64, w64.t()).to(at::kLong));
    } catch (const std::exception&) {
      return false;
    }
  }();
  return exact;
}

}  // namespace

at::Tensor int8_matmul(const at::Tensor& a, const at::Tensor& weight) {
  const int64_t m = a.size(0), K = a.size(1), N = weight.size(0);
  const at::TensorOptions acc_options = a.options().dtype(at::kInt);
  if (m == 0 || N == 0 || K == 0) return at::zeros({m, N}, acc_options);
  if (weight_format(weight) == WeightFormat::kPackedInt8) return packed_int8_matmul(a, weight);
  // CPU _int_mm returns garbage for K == 1 (torch 2.13).
  if (a.device().is_cpu() && K > 1 && cpu_int_mm_exact()) {
    return at::_int_mm(a.contiguous(), weight.t());
  }
  if (a.device().is_cuda() && K % 8 == 0 && N % 8 == 0) {
    // cuBLASLt's int8 GEMM: a row-major with more than 16 rows, W^T column-major
    // (W row-major: prepare_linear_weight returns it contiguous, so this is free).
    constexpr int64_t kMinRows = 17;
    const at::Tensor w_t = weight.contiguous().t();
    if (m >= kMinRows) return at::_int_mm(a.contiguous(), w_t);
    // Decode-sized blocks: zero rows up to the minimum, sliced off the result.
    at::Tensor padded = at::zeros({kMinRows, K}, a.options());
    padded.narrow(0, 0, m).copy_(a);
    return at::_int_mm(padded, w_t).narrow(0, 0, m);
  }
  // Exact fallback (K or N not a multiple of 8 on CUDA, K == 1 or an inexact _int_mm on
  // CPU, other devices): every partial sum of int8 products is an integer below 2^31 <
  // 2^53, and fp64 GEMMs know no reduced-precision mode.
  return at::mm(a.to(at::kDouble), weight.to(at::kDouble).t()).to(at::kInt);
}

at::Tensor zero_point_correction(const at::Tensor& weight, const at::Tensor& zero_point) {
  return weight_row_sums(weight) * zero_point.reshape({1}).to(at::kFloat);
}

void dequantize_into(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                     const at::Tensor& zp_corr, const at::Tensor* bias, at::Tensor& out) {
  const int64_t m = out.size(0), N = out.size(1);
  const bool scale_bytes = x_scale.scalar_type() == at::kChar;
  const bool cpu = out.device().is_cpu() && kernels::quant_supports(out.scalar_type()) &&
                   (N == 0 || (out.stride(1) == 1 && acc.stride(1) == 1));
  if (!cpu) {
    at::Tensor xs = x_scale;
    if (scale_bytes) {
      // A fresh copy: a one-row slice starts at byte K, which a float view needs 4-aligned.
      xs = x_scale.clone(at::MemoryFormat::Contiguous).view(at::kFloat).reshape({m, 1});
    }
    at::Tensor y = acc.to(at::kFloat);
    if (zp_corr.defined()) y.sub_(zp_corr);
    y.mul_(xs);                        // [1] or [m, 1] broadcasts over columns
    y.mul_(w_scale.reshape({1, -1}));  // [1, 1] or [1, N] broadcasts over rows
    if (bias != nullptr) y.add_(*bias);
    out.copy_(y);
    return;
  }
  if (m == 0 || N == 0) return;
  TORCH_INTERNAL_ASSERT(acc.scalar_type() == at::kInt || acc.scalar_type() == at::kFloat);
  const at::Tensor ws = w_scale.reshape({-1}).contiguous();
  // x scales as bytes: per tensor (stride 0), per token [m, 1] floats, or payload bytes.
  const at::Tensor xs = scale_bytes ? x_scale : x_scale.reshape({-1}).contiguous();
  const int64_t xs_stride =
      scale_bytes ? x_scale.stride(0) : (xs.numel() == 1 ? 0 : int64_t{sizeof(float)});
  const kernels::DequantArgs args{
      acc.const_data_ptr(),
      acc.scalar_type(),
      acc.stride(0),
      static_cast<const char*>(xs.const_data_ptr()),
      xs_stride,
      ws.const_data_ptr<float>(),
      ws.numel() > 1,
      zp_corr.defined() ? zp_corr.const_data_ptr<float>() : nullptr,
      bias != nullptr ? bias->const_data_ptr<float>() : nullptr,
      out.mutable_data_ptr(),
      out.scalar_type(),
      out.stride(0)};
  kernels::dequantize_kernel.get()(args, m, N);
}

}  // namespace ops
}  // namespace flashcomm
