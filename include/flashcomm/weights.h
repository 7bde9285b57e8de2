// flashcomm C++ API: the prepare step of a linear weight.
//
// prepare_linear_weight() packs a weight once, on the CPU, into the layout of
// torch's own oneDNN GEMMs; every flashcomm linear op (gemm_rs, ag_gemm, the sp_*
// linears, FP and W8A8) then takes the prepared tensor in its `weight` argument,
// unchanged: it reports the plain weight's sizes [N, K] and dtype, so argument
// checks, Meta kernels and torch.compile see the same op. The packed tensor
// replaces the plain one (keep only the result); it is opaque (no data_ptr, no
// views, no torch.save) and works only as the weight of these ops.
//
// Per dtype, packing is chosen only where it measured faster on the CPU it runs
// on and where this CPU supports it (see weight_packing_supported); otherwise,
// and on every non-CPU device, the weight comes back unchanged (plain, contiguous)
// and the ops use at::mm / _int_mm / cuBLAS as before.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>

#include <optional>

namespace flashcomm {

// weight [N, K]: float32 / bfloat16 / float16 (FP ops) or int8 (W8A8 ops; its
// weight_scale is not needed here and stays as it is).
// pack: nullopt = auto (pack where it pays on this CPU), true = pack (error if this
// CPU cannot), false = keep plain. Returns the prepared weight: packed, or the
// plain weight itself (made contiguous). An already packed weight is returned as is.
at::Tensor prepare_linear_weight(const at::Tensor& weight, std::optional<bool> pack = std::nullopt);

// True if `weight` is a packed weight (the result of packing, here or by torch's
// mkldnn::_reorder_linear_weight).
bool is_packed_weight(const at::Tensor& weight);

// True if this CPU can pack a weight of `dtype` (probed once: the packed product
// of a small weight must equal the plain one).
bool weight_packing_supported(c10::ScalarType dtype);

// True if prepare_linear_weight(w) with pack = nullopt packs a CPU weight of this
// dtype and sizes [N, K] on this CPU (supported, and measured to pay).
bool weight_packed_by_default(c10::ScalarType dtype, int64_t N, int64_t K);

}  // namespace flashcomm
