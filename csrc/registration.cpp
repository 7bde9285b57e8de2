// Every flashcomm schema, in one place. Real kernels are registered under
// CompositeExplicitAutograd: they use only ATen and the comm layer, so one
// registration serves CPU, CUDA and PrivateUse1 (Ascend) tensors. Meta kernels
// sit next to them and give the exact output shape, dtype and device
// symbolically, so torch.compile traces one graph whose shapes never depend on
// the strategy or the mode.
//
// Note: threshold / sp_threshold / enabled are plain op arguments (never read from
// globals at trace time) so the strategy and the mode are decided at run time
// inside the op, from the real token count: no graph break, no guard, no
// recompilation at the threshold.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <flashcomm/flashcomm.h>
#include <flashcomm/version.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <utility>

#include "ops/ops.h"

namespace {
constexpr auto kReal = c10::DispatchKey::CompositeExplicitAutograd;
constexpr auto kMeta = c10::DispatchKey::Meta;
constexpr auto kAutograd = c10::DispatchKey::Autograd;

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

// The one adapter between a schema and a C++ function: every parameter passes
// through unchanged except the group, which the schema carries as its c10d name
// (`str group_name`) and the C++ API as a ProcessGroup handle.
template <typename T>
struct SchemaArg {
  using type = T;
  static T from(T value, const char*) { return value; }
};
template <>
struct SchemaArg<const flashcomm::GroupPtr&> {
  using type = const std::string&;
  static flashcomm::GroupPtr from(const std::string& group_name, const char* op) {
    try {
      return c10d::resolve_process_group(group_name);
    } catch (const std::exception&) {
      TORCH_CHECK(false, op, ": unknown group_name '", group_name,
                  "': expected the group_name of an initialised c10d ProcessGroup "
                  "(e.g. torch.distributed.group.WORLD.group_name)");
    }
  }
};

template <const char* Op, auto Fn>
struct WithGroupName;
template <const char* Op, typename R, typename... Args, R (*Fn)(Args...)>
struct WithGroupName<Op, Fn> {
  static R call(typename SchemaArg<Args>::type... args) {
    return Fn(SchemaArg<Args>::from(args, Op)...);
  }
};

// A schema with the defaults of include/flashcomm/defaults.h in place of
// "{threshold}" and "{sp_threshold}": the defaults are written in one place.
std::string with_defaults(std::string schema) {
  const std::pair<const char*, int64_t> defaults[] = {
      {"{threshold}", flashcomm::kDefaultThreshold},
      {"{sp_threshold}", flashcomm::kDefaultSpThreshold}};
  for (const auto& [token, value] : defaults) {
    for (size_t at = schema.find(token); at != std::string::npos; at = schema.find(token)) {
      schema.replace(at, std::strlen(token), std::to_string(value));
    }
  }
  return schema;
}

// def + real + Meta + Autograd kernels of one op taking a group.
#define FLASHCOMM_GROUP_OP(m, name, schema, real, meta)                                   \
  do {                                                                                    \
    static constexpr char kName[] = #name;                                                \
    m.def(with_defaults(schema).c_str());                                                 \
    m.impl(#name, kReal, TORCH_FN((WithGroupName<kName, &real>::call)));                  \
    m.impl(#name, kMeta, TORCH_FN((WithGroupName<kName, &meta>::call)));                  \
    m.impl(#name, kAutograd, autograd_kernel());                                          \
  } while (0)
}  // namespace

TORCH_LIBRARY(flashcomm, m) {
  using namespace flashcomm;
  using namespace flashcomm::ops;

  // Row-parallel GEMM fused with reduce-scatter: [n, K_r] -> this rank's [ceil(n/tp), N].
  FLASHCOMM_GROUP_OP(m, gemm_rs,
                     "gemm_rs(Tensor x, Tensor weight, Tensor? bias, str group_name, "
                     "int threshold={threshold}, bool enabled=True) -> Tensor",
                     flashcomm::gemm_rs, gemm_rs_meta);

  // All-gather of [ceil(num_tokens/tp), K] shards fused with a column GEMM -> [num_tokens, N_r].
  FLASHCOMM_GROUP_OP(m, ag_gemm,
                     "ag_gemm(Tensor x, Tensor weight, Tensor? bias, str group_name, "
                     "SymInt num_tokens, int threshold={threshold}, bool enabled=True, "
                     "bool gather_output=False) -> Tensor",
                     flashcomm::ag_gemm, ag_gemm_meta);

  // W8A8 gemm_rs: int8 x int8 -> int32, dequantised to out_dtype, then reduce-scatter.
  FLASHCOMM_GROUP_OP(m, gemm_rs_w8a8,
                     "gemm_rs_w8a8(Tensor x, Tensor weight, Tensor weight_scale, "
                     "Tensor? input_scale, Tensor? input_zero_point, Tensor? bias, "
                     "str group_name, ScalarType out_dtype, int threshold={threshold}, "
                     "bool enabled=True) -> Tensor",
                     flashcomm::gemm_rs_w8a8, gemm_rs_w8a8_meta);

  // W8A8 ag_gemm: quantise the shard, all-gather int8 (+ per-token scales), int8 GEMM.
  FLASHCOMM_GROUP_OP(m, ag_gemm_w8a8,
                     "ag_gemm_w8a8(Tensor x, Tensor weight, Tensor weight_scale, "
                     "Tensor? input_scale, Tensor? input_zero_point, Tensor? bias, "
                     "str group_name, SymInt num_tokens, ScalarType out_dtype, "
                     "int threshold={threshold}, bool enabled=True, bool gather_output=False) -> Tensor",
                     flashcomm::ag_gemm_w8a8, ag_gemm_w8a8_meta);

  // Layout-invariant row-parallel linear [n, K_r] -> [n, N]: all-reduce, or RS into owned rows.
  FLASHCOMM_GROUP_OP(m, sp_row_linear,
                     "sp_row_linear(Tensor x, Tensor weight, Tensor? bias, str group_name, "
                     "int sp_threshold={sp_threshold}, bool enabled=True, int threshold=-1) -> Tensor",
                     flashcomm::sp_row_linear, sp_row_linear_meta);

  // W8A8 layout-invariant row-parallel linear.
  FLASHCOMM_GROUP_OP(m, sp_row_linear_w8a8,
                     "sp_row_linear_w8a8(Tensor x, Tensor weight, Tensor weight_scale, "
                     "Tensor? input_scale, Tensor? input_zero_point, Tensor? bias, "
                     "str group_name, ScalarType out_dtype, int sp_threshold={sp_threshold}, "
                     "bool enabled=True, int threshold=-1) -> Tensor",
                     flashcomm::sp_row_linear_w8a8, sp_row_linear_w8a8_meta);

  // Layout-invariant column-parallel linear [n, K] -> [n, N_r], all rows valid.
  FLASHCOMM_GROUP_OP(m, sp_column_linear,
                     "sp_column_linear(Tensor x, Tensor weight, Tensor? bias, str group_name, "
                     "int sp_threshold={sp_threshold}, bool enabled=True, int threshold=-1, "
                     "bool gather_output=False) -> Tensor",
                     flashcomm::sp_column_linear, sp_column_linear_meta);

  // W8A8 layout-invariant column-parallel linear (sharded: gathers int8 + scales).
  FLASHCOMM_GROUP_OP(m, sp_column_linear_w8a8,
                     "sp_column_linear_w8a8(Tensor x, Tensor weight, Tensor weight_scale, "
                     "Tensor? input_scale, Tensor? input_zero_point, Tensor? bias, "
                     "str group_name, ScalarType out_dtype, int sp_threshold={sp_threshold}, "
                     "bool enabled=True, int threshold=-1, bool gather_output=False) -> Tensor",
                     flashcomm::sp_column_linear_w8a8, sp_column_linear_w8a8_meta);

  // Boundary add + RMSNorm -> (normed, residual) [n, H]; sharded: owned rows (gather: all).
  FLASHCOMM_GROUP_OP(m, sp_add_rms_norm,
                     "sp_add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, "
                     "str group_name, int sp_threshold={sp_threshold}, bool enabled=True, "
                     "bool gather=False) -> (Tensor, Tensor)",
                     flashcomm::sp_add_rms_norm, sp_add_rms_norm_meta);

  // Row-parallel communication after an engine's own GEMM: [n, N] partial -> all-reduce, or RS into owned rows.
  FLASHCOMM_GROUP_OP(m, sp_reduce,
                     "sp_reduce(Tensor partial, str group_name, int sp_threshold={sp_threshold}, "
                     "bool enabled=True) -> Tensor",
                     flashcomm::sp_reduce, sp_reduce_meta);

  // In place: normed -> x, new residual -> residual (engines whose inputs are dead after the norm).
  FLASHCOMM_GROUP_OP(m, sp_add_rms_norm_,
                     "sp_add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, "
                     "str group_name, int sp_threshold={sp_threshold}, bool enabled=True, "
                     "bool gather=False) -> ()",
                     flashcomm::sp_add_rms_norm_, sp_add_rms_norm_meta_);

  // In place: partial [n, N] -> all-reduced, or reduce-scattered into its owned rows.
  FLASHCOMM_GROUP_OP(m, sp_reduce_,
                     "sp_reduce_(Tensor(a!) partial, str group_name, "
                     "int sp_threshold={sp_threshold}, bool enabled=True) -> ()",
                     flashcomm::sp_reduce_, sp_reduce_meta_);

  // Makes every row of [n, H] valid: sharded mode all-gathers the owned rows; replicated copies.
  FLASHCOMM_GROUP_OP(m, sp_gather,
                     "sp_gather(Tensor x, str group_name, int sp_threshold={sp_threshold}, "
                     "bool enabled=True) -> Tensor",
                     flashcomm::sp_gather, sp_gather_meta);

  // In place: x [n, H] -> every row valid (sharded: the owned rows all-gathered; replicated: as is).
  FLASHCOMM_GROUP_OP(m, sp_gather_,
                     "sp_gather_(Tensor(a!) x, str group_name, int sp_threshold={sp_threshold}, "
                     "bool enabled=True) -> ()",
                     flashcomm::sp_gather_, sp_gather_meta_);

  // The library version (pyproject.toml's, compiled in).
  m.def("version() -> str", TORCH_FN(version_op));
  // The CPU kernels' ISA and the extensions flashcomm may use ("avx512 avx512_bf16 ...").
  m.def("cpu_features() -> str", TORCH_FN(cpu_features_op));
  // The defaults (include/flashcomm/defaults.h and the transport's) as parallel lists.
  m.def("defaults() -> (str[], int[])", TORCH_FN(defaults_op));
  // The layout mode rule: "sharded" iff enabled and tp > 1 and n > sp_threshold.
  m.def("sp_mode(int n, int tp, int sp_threshold, bool enabled=True) -> str", TORCH_FN(sp_mode_op));
  // The strategy rule for a resolved threshold: "pipelined" iff enabled and tp > 1 and n > threshold.
  m.def("strategy(int n, int tp, int threshold, bool enabled=True) -> str", TORCH_FN(strategy_op));
  // threshold >= 0 unchanged; < 0: the tuning table's crossover of the op shape, else the default.
  m.def("resolve_threshold(str op, int k, int n, int tp, str dtype, int threshold) -> int",
        TORCH_FN(resolve_threshold_op));
  // [begin, end) of the rows rank `rank` owns in sharded mode.
  m.def("owned_rows(int n, int tp, int rank) -> int[]", TORCH_FN(owned_rows_op));
  // Rows per rank block, ceil(n / tp).
  m.def("shard_rows(int n, int tp) -> int", TORCH_FN(shard_rows_op));
  // The pipelined chunks of a rank block of c rows, flattened as [begin0, end0, begin1, ...].
  m.def("plan_chunks(int c, int max_chunks, int min_chunk_rows) -> int[]",
        TORCH_FN(plan_chunks_op));

  // Packs a linear weight [N, K] once for the linear ops (pack: None = auto, True, False).
  m.def("prepare_linear_weight(Tensor weight, bool? pack=None) -> Tensor",
        TORCH_FN(flashcomm::prepare_linear_weight));
  // True if the weight is packed (the ops' weight argument accepts it like the plain one).
  m.def("is_packed_weight(Tensor weight) -> bool", TORCH_FN(flashcomm::is_packed_weight));
  // True if this CPU can pack weights of the dtype (probed once).
  m.def("weight_packing_supported(ScalarType dtype) -> bool",
        TORCH_FN(flashcomm::weight_packing_supported));
  // True if prepare_linear_weight(pack=None) packs a CPU weight of this dtype and [N, K].
  m.def("weight_packed_by_default(ScalarType dtype, int N, int K) -> bool",
        TORCH_FN(flashcomm::weight_packed_by_default));

  // Per-op, per-path call counters as parallel lists ("<op>.<path>", count).
  m.def("stats() -> (str[], int[])", TORCH_FN(stats_op));
  // Zeroes every counter.
  m.def("reset_stats() -> ()", TORCH_FN(flashcomm::reset_stats));
  // Pipelined chunking (collective-steering: set identically on every rank).
  m.def("set_pipeline_config(int max_chunks, int min_chunk_rows) -> ()",
        TORCH_FN(flashcomm::set_pipeline_config));
  // Current pipelined chunking as [max_chunks, min_chunk_rows].
  m.def("get_pipeline_config() -> int[]", TORCH_FN(get_pipeline_config_op));
  // Bitwise mode invariance (collective-steering: set identically on every rank).
  m.def("set_bitwise_modes(bool on) -> ()", TORCH_FN(flashcomm::set_bitwise_modes));
  // Whether bitwise mode invariance is on (FLASHCOMM_BITWISE_MODES at first use).
  m.def("bitwise_modes() -> bool", TORCH_FN(flashcomm::bitwise_modes));
  // Registers the auto (threshold < 0) crossover of one op shape.
  m.def("set_auto_threshold(str op, int k, int n, int tp, str dtype, int threshold) -> ()",
        TORCH_FN(set_auto_threshold_op));
  // Forgets every auto crossover: threshold < 0 falls back to the default.
  m.def("clear_auto_thresholds() -> ()", TORCH_FN(clear_auto_thresholds_op));
  // Checks that every rank of the group holds the same collective-steering settings.
  m.def("verify_agreement(str group_name, str[] names, int[] values, Device device) -> ()",
        TORCH_FN(verify_agreement_op));
  // Routes the group's all-reduces through a registered op with vLLM's all_reduce schema.
  m.def("set_all_reduce_provider(str group_name, str op, str provider_group) -> ()",
        TORCH_FN(flashcomm::set_all_reduce_provider));
  // Back to the transport for the group's all-reduces.
  m.def("clear_all_reduce_provider(str group_name) -> ()",
        TORCH_FN(flashcomm::clear_all_reduce_provider));
  // "op(provider_group)" of the group's all-reduce provider, "" if none.
  m.def("all_reduce_provider(str group_name) -> str", TORCH_FN(all_reduce_provider_op));
  // Transport request of a group before its first use: "auto", "c10d" or "shm".
  m.def("set_transport(str group_name, str transport) -> ()", TORCH_FN(set_transport_op));
  // Transport a group uses ("c10d" / "shm"), "" before its first use.
  m.def("transport(str group_name) -> str", TORCH_FN(transport_op));
}

// Test-only hooks, outside the public `flashcomm` namespace (torch.ops.flashcomm_testing).
TORCH_LIBRARY(flashcomm_testing, m) {
  using namespace flashcomm::ops;
  // The agreement check believes the current stream is capturing a CUDA graph.
  m.def("set_capturing(bool capturing) -> ()", TORCH_FN(set_capturing_for_testing_op));
  // The group transport's plain in-place all-reduce, which no op reaches (a group with an
  // all-reduce provider, the only caller of the plain all-reduce, bypasses it).
  m.def("all_reduce(Tensor(a!) t, str group_name) -> ()", TORCH_FN(all_reduce_for_testing_op));
  // FLASHCOMM_DEBUG_POISON (read once per process) switched on or off from now on.
  m.def("set_debug_poison(bool on) -> ()", TORCH_FN(set_debug_poison_for_testing_op));
}
