// flashcomm C++ API: the compact sequence-parallel ops for engines built on
// libtorch, without Python. The same functions back the `torch.ops.flashcomm`
// custom ops (which take a c10d group *name* instead of a group handle).
//
// Layout (tp = group size, r = group rank, c = ceil(n / tp)): a token-sharded
// activation is a compact [c, H] tensor; rank r holds global token rows
// [r*c, r*c + c) and rows at or past n are zero padding.
//
// Every collective-steering decision depends only on rank-invariant values
// (n, tp, shapes, threshold, enabled), so all ranks issue the same collectives.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <flashcomm/defaults.h>
#include <flashcomm/weights.h>

#include <cstdint>
#include <optional>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <tuple>
#include <utility>
#include <vector>

namespace flashcomm {

using GroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;


// Row-parallel GEMM fused with reduce-scatter.
//   x      [n, K_r]  this rank's input-feature slice (all n tokens)
//   weight [N, K_r]  nn.Linear layout, same dtype as x
//   bias   [N]       optional; added exactly once per row (by rank 0, before the
//                    reduction), so it may be passed on rank 0 only or on all ranks
// Returns [c, N]: global rows [r*c, r*c + c) of sum_ranks(x_r @ W_r^T) + bias,
// rows >= n zero. tp == 1 returns [n, N].
at::Tensor gemm_rs(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const GroupPtr& group,
                   int64_t threshold = kDefaultThreshold, bool enabled = true);

// All-gather of token shards fused with a column-parallel GEMM.
//   x      [c, K]    this rank's token shard, c == ceil(num_tokens / tp)
//   weight [N_r, K]  this rank's output-feature slice
//   bias   [N_r]     optional, this rank's slice
// Returns [num_tokens, N_r] (padding dropped), or with gather_output the
// output features of all ranks concatenated in rank order: [num_tokens, N_r*tp].
at::Tensor ag_gemm(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const GroupPtr& group, int64_t num_tokens,
                   int64_t threshold = kDefaultThreshold, bool enabled = true,
                   bool gather_output = false);

// W8A8 gemm_rs. weight int8 [N, K_r]; weight_scale fp32 [N], [N, 1] or [1].
// x floating point is quantised inside: static per-tensor with input_scale [1]
// (and optional int32 input_zero_point [1]: asymmetric), dynamic per-token
// symmetric without it. x int8 requires input_scale ([1] or per-token [n, 1]).
// int8 x int8 -> int32 accumulation, dequantised in fp32, bias in fp32, output
// in out_dtype (a floating type). Same output layout as gemm_rs.
at::Tensor gemm_rs_w8a8(const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& weight_scale,
                        const std::optional<at::Tensor>& input_scale,
                        const std::optional<at::Tensor>& input_zero_point,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        c10::ScalarType out_dtype, int64_t threshold = kDefaultThreshold,
                        bool enabled = true);

// W8A8 ag_gemm: quantises this rank's shard first and all-gathers int8 values
// (plus per-token scales in the same message). int8 x takes input_scale [1] or
// per-token [c, 1]. Same output layout as ag_gemm, dtype out_dtype.
at::Tensor ag_gemm_w8a8(const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& weight_scale,
                        const std::optional<at::Tensor>& input_scale,
                        const std::optional<at::Tensor>& input_zero_point,
                        const std::optional<at::Tensor>& bias, const GroupPtr& group,
                        int64_t num_tokens, c10::ScalarType out_dtype,
                        int64_t threshold = kDefaultThreshold, bool enabled = true,
                        bool gather_output = false);

// ---------------------------------------------------------------------------
// Layout-invariant ops. Hidden states are [n, H] on every rank in both modes:
//   replicated (n <= sp_threshold, tp == 1 or !enabled): all rows valid on every
//     rank, exactly plain TP (GEMM + all-reduce);
//   sharded: rank r's owned rows [r*c, min(n, r*c + c)) valid, the rest
//     don't-care (NaN when FLASHCOMM_DEBUG_POISON=1).
// The mode is a pure function of (n, tp, sp_threshold, enabled); pass the same
// sp_threshold to every op of a model. `threshold` is the compact kernels'
// strategy threshold used in sharded mode (< 0: auto).

// Row-parallel linear: x [n, K_r] (all rows valid), weight [N, K_r] -> [n, N].
// Replicated: GEMM + all-reduce; sharded: GEMM + reduce-scatter into the owned rows.
at::Tensor sp_row_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const GroupPtr& group,
                         int64_t sp_threshold = kDefaultSpThreshold, bool enabled = true,
                         int64_t threshold = -1);

at::Tensor sp_row_linear_w8a8(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& weight_scale,
                              const std::optional<at::Tensor>& input_scale,
                              const std::optional<at::Tensor>& input_zero_point,
                              const std::optional<at::Tensor>& bias, const GroupPtr& group,
                              c10::ScalarType out_dtype, int64_t sp_threshold = kDefaultSpThreshold,
                              bool enabled = true, int64_t threshold = -1);

// Column-parallel linear: x [n, K] (replicated: all rows valid; sharded: owned
// rows valid), weight [N_r, K] -> [n, N_r] with all rows valid (sharded: the
// owned rows are all-gathered, fused with the GEMM). gather_output: [n, N_r * tp].
at::Tensor sp_column_linear(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const GroupPtr& group,
                            int64_t sp_threshold = kDefaultSpThreshold, bool enabled = true,
                            int64_t threshold = -1, bool gather_output = false);

// W8A8 column-parallel linear; sharded mode quantises the owned rows and
// all-gathers int8 values plus scales.
at::Tensor sp_column_linear_w8a8(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& input_scale,
                                 const std::optional<at::Tensor>& input_zero_point,
                                 const std::optional<at::Tensor>& bias, const GroupPtr& group,
                                 c10::ScalarType out_dtype,
                                 int64_t sp_threshold = kDefaultSpThreshold, bool enabled = true,
                                 int64_t threshold = -1, bool gather_output = false);

// Boundary add + RMSNorm in vLLM's fused convention: s = x + residual (fp32),
// returns (rmsnorm(s) * weight, s) in x's dtype ([n, H] each; residual may be
// absent: s = x). Sharded mode computes only the owned rows; `gather` (the final
// norm) all-gathers them so every row of the normed output is valid.
std::tuple<at::Tensor, at::Tensor> sp_add_rms_norm(const at::Tensor& x,
                                                   const std::optional<at::Tensor>& residual,
                                                   const at::Tensor& weight, double eps,
                                                   const GroupPtr& group,
                                                   int64_t sp_threshold = kDefaultSpThreshold,
                                                   bool enabled = true, bool gather = false);

// Row-parallel communication after an engine's own GEMM (the split form of a
// row-parallel layer: the engine computes the partial product with its packed
// kernel, flashcomm finishes the layer). partial [n, N] (this rank's partial sum,
// every row) -> [n, N]: replicated mode all-reduces (every row valid); sharded
// mode reduce-scatters into the owned rows (the rest don't-care).
at::Tensor sp_reduce(const at::Tensor& partial, const GroupPtr& group,
                     int64_t sp_threshold = kDefaultSpThreshold, bool enabled = true);

// In-place forms, for engines whose inputs are dead after the call (vLLM's own fused
// add + RMSNorm works this way): no output is allocated. sp_add_rms_norm_ writes
// normed into x and the new residual into residual (both [n, H], contiguous,
// distinct); sp_reduce_ reduces `partial` in place (sharded: into its owned rows).
void sp_add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps,
                      const GroupPtr& group, int64_t sp_threshold = kDefaultSpThreshold,
                      bool enabled = true, bool gather = false);
void sp_reduce_(at::Tensor& partial, const GroupPtr& group,
                int64_t sp_threshold = kDefaultSpThreshold, bool enabled = true);

// Makes every row of x [n, H] valid on every rank: sharded mode all-gathers the
// owned rows (in front of an engine's own column-parallel GEMM when no norm does
// it); replicated mode returns a copy.
at::Tensor sp_gather(const at::Tensor& x, const GroupPtr& group,
                     int64_t sp_threshold = kDefaultSpThreshold, bool enabled = true);
// In place: x [n, H] (contiguous) gets every rank's owned rows (sharded); replicated:
// nothing to do.
void sp_gather_(at::Tensor& x, const GroupPtr& group, int64_t sp_threshold = kDefaultSpThreshold,
                bool enabled = true);

// ("<op>.<path>", calls) for every op: compact ops count "sequential" /
// "pipelined", layout-invariant ops "replicated" / "sharded".
std::vector<std::pair<std::string, int64_t>> stats();
void reset_stats();

// Chunking of the pipelined strategy; steers the collective pattern, so set it
// identically on every rank.
void set_pipeline_config(int64_t max_chunks, int64_t min_chunk_rows);

// Bitwise mode invariance (FLASHCOMM_BITWISE_MODES, default off): when on, every
// layout-invariant op returns bitwise the same rows replicated and sharded, on every
// transport and tp (README, "Numerics across the threshold"). Steers collectives:
// set it identically on every rank (compared at a group's next flashcomm::init).
void set_bitwise_modes(bool on);
bool bitwise_modes();

// Routes the all-reduces of the c10d group `group_name` (the replicated path) through
// the registered op `op` with the schema (Tensor tensor, str group_name) -> Tensor,
// e.g. "vllm::all_reduce", which knows the same ranks as `provider_group`. Set it
// identically on every rank; the ranks compare it at the group's next use.
void set_all_reduce_provider(const std::string& group_name, const std::string& op,
                             const std::string& provider_group);
void clear_all_reduce_provider(const std::string& group_name);

// Collective over `group` (call it on every rank): the ranks compare every
// setting that steers collectives (version, pipeline config, tuning table,
// all-reduce provider, transport, and `settings`, e.g. the model-wide
// sp_threshold) and choose the group's transport; a difference raises the same
// error on every rank. The ops do this by themselves at a group's first use; call
// it explicitly before CUDA-graph capture, or after changing a setting. `device`:
// where the check's collective runs (CPU for gloo, the current CUDA device for NCCL).
void init(const GroupPtr& group, const at::Device& device,
          const std::vector<std::pair<std::string, int64_t>>& settings = {});

// Transport of `group` before its first use: "auto" (default, or the
// FLASHCOMM_TRANSPORT variable): host shared memory when every rank is a CPU
// process on this host and can map its peers' segments, else c10d; "shm": shared
// memory or an error saying why not; "c10d": the ProcessGroup.
void set_transport(const GroupPtr& group, const std::string& transport);

}  // namespace flashcomm
