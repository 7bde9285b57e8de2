// Every flashcomm schema, in one place. Real kernels are registered under
// CompositeExplicitAutograd: they use only ATen and c10d, so one registration
// serves CPU, CUDA and PrivateUse1 (Ascend) tensors. Meta kernels sit next to
// them and give the exact output shape, dtype and device symbolically, so
// torch.compile traces one graph whose shapes never depend on the strategy.
//
// Note: threshold / enabled are plain op arguments (never read from globals at
// trace time) so the strategy is decided at run time inside the op, from the
// real token count: no graph break, no guard, no recompilation at the threshold.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include "ops/ops.h"

namespace {
constexpr auto kReal = c10::DispatchKey::CompositeExplicitAutograd;
constexpr auto kMeta = c10::DispatchKey::Meta;

// Autograd kernel of every tensor op: the ops are inference-only (no backward),
// so a call that would need one fails with a clear message instead of deep
// inside an ATen kernel; otherwise it runs below autograd.
void inference_only(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                    torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const auto& schema = op.schema();
    const size_t num_args = schema.arguments().size();
    for (size_t i = 0; i < num_args; ++i) {
      const c10::IValue& arg = (*stack)[stack->size() - num_args + i];
      TORCH_CHECK(!(arg.isTensor() && arg.toTensor().requires_grad()), schema.name(),
                  ": argument '", schema.arguments()[i].name(),
                  "' requires grad, but flashcomm ops are inference-only (no backward); call "
                  "them under torch.no_grad() / torch.inference_mode() or detach the input");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

torch::CppFunction autograd_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&inference_only>();
}
constexpr auto kAutograd = c10::DispatchKey::Autograd;
}  // namespace

TORCH_LIBRARY(flashcomm, m) {
  using namespace flashcomm::ops;

  // Row-parallel GEMM fused with reduce-scatter: [n, K_r] -> this rank's [ceil(n/tp), N].
  m.def(
      "gemm_rs(Tensor x, Tensor weight, Tensor? bias, str group_name, "
      "int threshold=1000, bool enabled=True) -> Tensor");
  m.impl("gemm_rs", kReal, TORCH_FN(gemm_rs_op));
  m.impl("gemm_rs", kMeta, TORCH_FN(gemm_rs_meta));
  m.impl("gemm_rs", kAutograd, autograd_kernel());

  // All-gather of [ceil(num_tokens/tp), K] shards fused with a column GEMM -> [num_tokens, N_r].
  m.def(
      "ag_gemm(Tensor x, Tensor weight, Tensor? bias, str group_name, SymInt num_tokens, "
      "int threshold=1000, bool enabled=True, bool gather_output=False) -> Tensor");
  m.impl("ag_gemm", kReal, TORCH_FN(ag_gemm_op));
  m.impl("ag_gemm", kMeta, TORCH_FN(ag_gemm_meta));
  m.impl("ag_gemm", kAutograd, autograd_kernel());

  // W8A8 gemm_rs: int8 x int8 -> int32, dequantised to out_dtype, then reduce-scatter.
  m.def(
      "gemm_rs_w8a8(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, "
      "Tensor? input_zero_point, Tensor? bias, str group_name, ScalarType out_dtype, "
      "int threshold=1000, bool enabled=True) -> Tensor");
  m.impl("gemm_rs_w8a8", kReal, TORCH_FN(gemm_rs_w8a8_op));
  m.impl("gemm_rs_w8a8", kMeta, TORCH_FN(gemm_rs_w8a8_meta));
  m.impl("gemm_rs_w8a8", kAutograd, autograd_kernel());

  // W8A8 ag_gemm: quantise the shard, all-gather int8 (+ per-token scales), int8 GEMM.
  m.def(
      "ag_gemm_w8a8(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, "
      "Tensor? input_zero_point, Tensor? bias, str group_name, SymInt num_tokens, "
      "ScalarType out_dtype, int threshold=1000, bool enabled=True, "
      "bool gather_output=False) -> Tensor");
  m.impl("ag_gemm_w8a8", kReal, TORCH_FN(ag_gemm_w8a8_op));
  m.impl("ag_gemm_w8a8", kMeta, TORCH_FN(ag_gemm_w8a8_meta));
  m.impl("ag_gemm_w8a8", kAutograd, autograd_kernel());

  // Layout-invariant row-parallel linear [n, K_r] -> [n, N]: all-reduce, or RS into owned rows.
  m.def(
      "sp_row_linear(Tensor x, Tensor weight, Tensor? bias, str group_name, "
      "int sp_threshold=1000, bool enabled=True, int threshold=-1) -> Tensor");
  m.impl("sp_row_linear", kReal, TORCH_FN(sp_row_linear_op));
  m.impl("sp_row_linear", kMeta, TORCH_FN(sp_row_linear_meta));
  m.impl("sp_row_linear", kAutograd, autograd_kernel());

  // W8A8 layout-invariant row-parallel linear.
  m.def(
      "sp_row_linear_w8a8(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, "
      "Tensor? input_zero_point, Tensor? bias, str group_name, ScalarType out_dtype, "
      "int sp_threshold=1000, bool enabled=True, int threshold=-1) -> Tensor");
  m.impl("sp_row_linear_w8a8", kReal, TORCH_FN(sp_row_linear_w8a8_op));
  m.impl("sp_row_linear_w8a8", kMeta, TORCH_FN(sp_row_linear_w8a8_meta));
  m.impl("sp_row_linear_w8a8", kAutograd, autograd_kernel());

  // Layout-invariant column-parallel linear [n, K] -> [n, N_r], all rows valid.
  m.def(
      "sp_column_linear(Tensor x, Tensor weight, Tensor? bias, str group_name, "
      "int sp_threshold=1000, bool enabled=True, int threshold=-1, "
      "bool gather_output=False) -> Tensor");
  m.impl("sp_column_linear", kReal, TORCH_FN(sp_column_linear_op));
  m.impl("sp_column_linear", kMeta, TORCH_FN(sp_column_linear_meta));
  m.impl("sp_column_linear", kAutograd, autograd_kernel());

  // W8A8 layout-invariant column-parallel linear (sharded: gathers int8 + scales).
  m.def(
      "sp_column_linear_w8a8(Tensor x, Tensor weight, Tensor weight_scale, "
      "Tensor? input_scale, Tensor? input_zero_point, Tensor? bias, str group_name, "
      "ScalarType out_dtype, int sp_threshold=1000, bool enabled=True, int threshold=-1, "
      "bool gather_output=False) -> Tensor");
  m.impl("sp_column_linear_w8a8", kReal, TORCH_FN(sp_column_linear_w8a8_op));
  m.impl("sp_column_linear_w8a8", kMeta, TORCH_FN(sp_column_linear_w8a8_meta));
  m.impl("sp_column_linear_w8a8", kAutograd, autograd_kernel());

  // Boundary add + RMSNorm -> (normed, residual) [n, H]; sharded: owned rows (gather: all).
  m.def(
      "sp_add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, str group_name, "
      "int sp_threshold=1000, bool enabled=True, bool gather=False) -> (Tensor, Tensor)");
  m.impl("sp_add_rms_norm", kReal, TORCH_FN(sp_add_rms_norm_op));
  m.impl("sp_add_rms_norm", kMeta, TORCH_FN(sp_add_rms_norm_meta));
  m.impl("sp_add_rms_norm", kAutograd, autograd_kernel());

  // Per-op, per-path call counters as parallel lists ("<op>.<path>", count).
  m.def("stats() -> (str[], int[])", TORCH_FN(stats_op));
  // Zeroes every counter.
  m.def("reset_stats() -> ()", TORCH_FN(reset_stats_op));
  // Pipelined chunking (collective-steering: set identically on every rank).
  m.def("set_pipeline_config(int max_chunks, int min_chunk_rows) -> ()",
        TORCH_FN(set_pipeline_config_op));
  // Current pipelined chunking as [max_chunks, min_chunk_rows].
  m.def("get_pipeline_config() -> int[]", TORCH_FN(get_pipeline_config_op));
  // Registers the auto (threshold < 0) crossover of one op shape.
  m.def("set_auto_threshold(str op, int k, int n, int tp, str dtype, int threshold) -> ()",
        TORCH_FN(set_auto_threshold_op));
  // Checks that every rank of the group holds the same collective-steering settings.
  m.def("verify_agreement(str group_name, str[] names, int[] values, Device device) -> ()",
        TORCH_FN(verify_agreement_op));
  // Routes the group's all-reduces through a registered op with vLLM's all_reduce schema.
  m.def("set_all_reduce_provider(str group_name, str op, str provider_group) -> ()",
        TORCH_FN(set_all_reduce_provider_op));
  // Back to the ProcessGroup for the group's all-reduces.
  m.def("clear_all_reduce_provider(str group_name) -> ()",
        TORCH_FN(clear_all_reduce_provider_op));
  // "op(provider_group)" of the group's all-reduce provider, "" if none.
  m.def("all_reduce_provider(str group_name) -> str", TORCH_FN(all_reduce_provider_op));
  // Forgets every auto crossover: threshold < 0 falls back to 1000.
  m.def("clear_auto_thresholds() -> ()", TORCH_FN(clear_auto_thresholds_op));
}
