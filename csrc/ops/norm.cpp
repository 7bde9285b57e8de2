#include "ops/norm.h"

#include "kernels/cpu/add_rms_norm.h"

namespace flashcomm::kernels {

// Entries registered by the add_rms_norm_kernel.cpp copies (one per ISA).
KernelTable<AddRmsNormFn> add_rms_norm_kernel;

}  // namespace flashcomm::kernels

namespace flashcomm::ops {

namespace {

// Rows of `t` are contiguous runs of H elements that the kernel may index as
// pointer + row * stride(0) + j.
bool unit_rows(const at::Tensor& t, int64_t H) {
  return t.layout() == at::kStrided && !t.is_neg() && (t.stride(1) == 1 || H <= 1);
}

// Outputs must also not overlap themselves (a zero or short row stride).
bool unit_distinct_rows(const at::Tensor& t, int64_t rows, int64_t H) {
  return unit_rows(t, H) && (rows <= 1 || t.stride(0) >= H);
}

// The dtypes the CPU kernel runs for on this machine. x86-64 CPUs without AVX2
// run the DEFAULT copy, which has no fp16 conversion instructions (no F16C);
// there ATen's composite converts fp16 faster than the kernel's scalar loops
// (about 3x, [64, 640]), so fp16 stays on the composite.
bool cpu_kernel_dtype(c10::ScalarType dtype) {
#if defined(__x86_64__) || defined(_M_X64)
  if (dtype == c10::kHalf && kernels::cpu_isa() == kernels::Isa::kDefault) return false;
#endif
  return kernels::add_rms_norm_supports(dtype);
}

// Which path runs, per device and dtype:
//   CPU, float32 / bfloat16 / float16 (float16 on x86-64: with AVX2), rows with
//     element stride 1 -> the fused kernel (kernels/cpu/add_rms_norm.h: two
//     sweeps over each row, no temporaries, ISA picked at first use);
//   anything else (CUDA, Ascend PrivateUse1, Meta, float64, other layouts) ->
//     the composite ATen expression below, which defines the numerics the
//     kernel reproduces.
bool use_cpu_kernel(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                    const at::Tensor& normed, const at::Tensor& residual_out) {
  const int64_t rows = x.size(0), H = x.size(1);
  const c10::ScalarType dtype = x.scalar_type();
  return x.device().is_cpu() && cpu_kernel_dtype(dtype) && unit_rows(x, H) &&
         (!residual.has_value() || unit_rows(*residual, H)) && normed.device().is_cpu() &&
         residual_out.device().is_cpu() && normed.scalar_type() == dtype &&
         residual_out.scalar_type() == dtype && unit_distinct_rows(normed, rows, H) &&
         unit_distinct_rows(residual_out, rows, H);
}

void composite_add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                            const at::Tensor& weight, double eps, at::Tensor normed,
                            const at::Tensor& residual_out) {
  at::Tensor s = x.to(at::kFloat);
  if (residual.has_value()) s = s + residual->to(at::kFloat);
  residual_out.copy_(s);
  const at::Tensor inv_rms = at::rsqrt(s.pow(2).mean(/*dim=*/{-1}, /*keepdim=*/true) + eps);
  at::mul_out(normed, (s * inv_rms).to(x.scalar_type()), weight.to(x.scalar_type()));
}

}  // namespace

void add_rms_norm_rows(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const at::Tensor& weight, double eps, const at::Tensor& normed,
                       const at::Tensor& residual_out) {
  if (!use_cpu_kernel(x, residual, normed, residual_out)) {
    composite_add_rms_norm(x, residual, weight, eps, normed, residual_out);
    return;
  }
  const int64_t H = x.size(1);
  // The kernel reads weight as a contiguous [H] of x's dtype: convert only when
  // it is not one already (vLLM keeps the norm weight in the activation dtype).
  const bool weight_ready = weight.scalar_type() == x.scalar_type() &&
                            weight.layout() == at::kStrided && !weight.is_neg() &&
                            (weight.stride(0) == 1 || H <= 1);
  const at::Tensor converted =
      weight_ready ? at::Tensor() : weight.to(x.scalar_type()).resolve_neg().contiguous();
  const at::Tensor& w = weight_ready ? weight : converted;

  kernels::AddRmsNormArgs args;
  args.x = x.const_data_ptr();
  args.x_row_stride = x.stride(0);
  args.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  args.residual_row_stride = residual.has_value() ? residual->stride(0) : 0;
  args.weight = w.const_data_ptr();
  args.normed = normed.mutable_data_ptr();
  args.normed_row_stride = normed.stride(0);
  args.residual_out = residual_out.mutable_data_ptr();
  args.residual_out_row_stride = residual_out.stride(0);
  args.rows = x.size(0);
  args.hidden = H;
  // The composite adds eps to the fp32 mean as an fp32 scalar; so does the kernel.
  args.eps = static_cast<float>(eps);
  args.dtype = x.scalar_type();
  kernels::AddRmsNormFn* kernel = kernels::add_rms_norm_kernel.get();
  TORCH_INTERNAL_ASSERT(kernel != nullptr, "add_rms_norm: no CPU kernel registered");
  kernel(args);
}

}  // namespace flashcomm::ops
