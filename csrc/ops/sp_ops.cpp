// Layout-invariant sequence-parallel ops (docs/DESIGN.md, "Two layouts"). Hidden
// states keep the full shape [n, H] on every rank; the mode decides which rows are
// valid:
//   replicated (n <= sp_threshold, or tp == 1, or disabled): every row, on every
//     rank -- exactly plain TP (GEMM + all-reduce);
//   sharded: rank r's owned rows [r*c, min(n, r*c + c)), c = ceil(n / tp); the
//     other rows are don't-care (NaN with FLASHCOMM_DEBUG_POISON=1).
// The mode is a pure function of (n, tp, sp_threshold, enabled), all
// rank-invariant and identical in every op of a forward pass, and no output
// shape depends on it: one compiled graph serves every n.
#include <flashcomm/flashcomm.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "comm/comm.h"
#include "core/policy.h"
#include "core/settings.h"
#include "core/shard.h"
#include "core/stats.h"
#include "ops/checks.h"
#include "ops/linear.h"
#include "ops/norm.h"
#include "ops/ops.h"
#include "ops/pipeline.h"

namespace flashcomm {

using core::Mode;
using core::OpId;
using core::RowRange;

namespace {

// The group of one call, ready (agreed, transport chosen), and the call's mode.
struct ModeCall {
  comm::Group group;
  Mode mode;
  comm::CallInfo info;
};

ModeCall decide_mode(OpId op, const GroupPtr& pg, const at::Device& device, int64_t n,
                     int64_t sp_threshold, bool enabled, int64_t threshold) {
  const char* name = core::op_name(op);
  comm::Group g = comm::resolve(pg, name);
  comm::ensure_ready(
      g, name, device,
      {{"sp_threshold", sp_threshold}, {"enabled", enabled}, {"threshold", threshold}});
  const Mode m = core::choose_mode(n, g.size(), sp_threshold, enabled, g.collective());
  core::Stats::instance().record(op, m);
  return {std::move(g), m, {name, n, static_cast<int8_t>(m), -1}};
}

// Debug switch: don't-care rows become NaN, so a consumer that reads them
// poisons the result. FLASHCOMM_DEBUG_POISON is read at the first call of a process
// (-1: not read yet); the test hook flashcomm_testing::set_debug_poison overrides it.
std::atomic<int> g_poison{-1};

bool poison_enabled() {
  int v = g_poison.load(std::memory_order_relaxed);
  if (v < 0) {
    try {
      v = core::settings::env_bool("FLASHCOMM_DEBUG_POISON", false) ? 1 : 0;
    } catch (const core::settings::SettingError& e) {
      TORCH_CHECK(false, e.what());
    }
    int expected = -1;
    if (!g_poison.compare_exchange_strong(expected, v)) v = expected;
  }
  return v == 1;
}

void poison_outside(at::Tensor& t, RowRange valid) {
  if (!poison_enabled() || !at::isFloatingType(t.scalar_type())) return;
  const int64_t rows = t.size(0);
  if (valid.begin > 0) t.narrow(0, 0, valid.begin).fill_(NAN);
  if (valid.end < rows) t.narrow(0, valid.end, rows - valid.end).fill_(NAN);
}

RowRange owned(const comm::Group& group, int64_t n) {
  return core::owned_rows(n, group.size(), group.rank());
}

// This rank's block of rows of t [n, ...] as a [c, ...] tensor: a view when the
// block lies inside t, else a copy with zero padding rows.
at::Tensor owned_block(const at::Tensor& t, const comm::Group& group) {
  const int64_t n = t.size(0), tp = group.size(), r = group.rank();
  const int64_t c = core::shard_rows(n, tp);
  if (r * c + c <= n) return t.narrow(0, r * c, c);
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[0] = c;
  at::Tensor block = at::zeros(sizes, t.options());
  const RowRange mine = owned(group, n);
  if (mine.size() > 0) block.narrow(0, 0, mine.size()).copy_(t.narrow(0, mine.begin, mine.size()));
  return block;
}

// Bitwise mode invariance (core::bitwise_modes(), README "Numerics across the
// threshold"). A replicated call gives the sharded call's bits when both sum every
// row in the same order and hand flashcomm's GEMM the same rows.
// The sums: shm sums every element in rank order in every collective; at tp = 2 every
// collective computes one addition of two partials (commutative); c10d at tp >= 3
// (gloo, NCCL) and an all-reduce provider may add in another order in an all-reduce
// than in a reduce-scatter.
bool sums_may_differ(const comm::Group& g) {
  if (comm::has_all_reduce_provider(g)) return true;
  return g.size() >= 3 && std::string(g.transport().name()) != "shm";
}

bool bitwise(const comm::Group& g) { return g.collective() && core::bitwise_modes(); }

// Row-parallel output [n, N]: all-reduce (replicated) or reduce-scatter into the
// owned rows (sharded). `compact_op` >= 0: the sharded path counts and picks a
// kernel strategy as that compact op (threshold); else it runs sequential. `out`,
// when defined ([n, N], contiguous), receives the result (it may be the memory the
// linear reads: every step copies its rows before any of them is overwritten).
// With bitwise mode invariance, a replicated call that could differ runs the
// sharded path's GEMMs and reduce-scatters (same strategy, same steps, same row
// blocks of c rows, padded), then all-gathers the owned rows: every row is summed
// by the same collective in both modes.
at::Tensor row_parallel(const ModeCall& mc, int compact_op, const ops::RowLinear& linear, int64_t K,
                        c10::ScalarType key_dtype, int64_t threshold,
                        at::Tensor out = at::Tensor()) {
  const comm::Group& g = mc.group;
  const int64_t n = linear.n, N = linear.out_features, tp = g.size();
  // The GEMMs (compact_op >= 0: flashcomm's own): a GEMM's row may depend on how many
  // rows it gets, and the sharded path may give it blocks of rows (pipelined chunks,
  // steps cut to the transport's capacity).
  bool as_sharded = false;
  if (mc.mode == Mode::kReplicated && bitwise(g)) {
    as_sharded = sums_may_differ(g);
    if (!as_sharded && compact_op >= 0) {
      const core::Strategy s =
          ops::decide_strategy(static_cast<OpId>(compact_op), g, n, K, N, key_dtype, threshold,
                               /*enabled=*/true, /*record=*/false);
      const int64_t element_size =
          static_cast<int64_t>(linear.out_options.dtype().itemsize());
      as_sharded = !ops::row_gemm_in_one_call(g, s, n, N, element_size, mc.info.op);
    }
  }
  if (mc.mode == Mode::kReplicated && !as_sharded) {
    if (!out.defined()) out = at::empty({n, N}, linear.out_options);
    ops::gemm_all_reduce(g, linear, out, mc.info);
    return out;
  }
  const int64_t c = core::shard_rows(n, tp), r = g.rank();
  const core::Strategy s =
      compact_op >= 0 ? ops::decide_strategy(static_cast<OpId>(compact_op), g, n, K, N, key_dtype,
                                             threshold, /*enabled=*/true, /*record=*/!as_sharded)
                      : core::Strategy::kSequential;
  comm::CallInfo info = mc.info;
  info.strategy = static_cast<int8_t>(s);
  if (!out.defined()) {
    // Rank r's block lands at rows [r*c, r*c + c) of a [tp*c, N] buffer whose first
    // n rows are the output: no copy, padding rows fall outside the returned view.
    at::Tensor full = at::empty({tp * c, N}, linear.out_options);
    ops::gemm_reduce_scatter(g, s, linear, full.narrow(0, r * c, c), info);
    out = full.narrow(0, 0, n);
  } else if (r * c + c <= n) {
    ops::gemm_reduce_scatter(g, s, linear, out.narrow(0, r * c, c), info);
  } else {  // the last block runs past n: its padding rows need room
    at::Tensor block = at::empty({c, N}, linear.out_options);
    ops::gemm_reduce_scatter(g, s, linear, block, info);
    const RowRange mine = owned(g, n);
    if (mine.size() > 0) {
      out.narrow(0, mine.begin, mine.size()).copy_(block.narrow(0, 0, mine.size()));
    }
  }
  if (as_sharded) {
    ops::gather_owned_rows(g, out, info);  // every row valid, as replicated promises
    return out;
  }
  poison_outside(out, owned(g, n));
  return out;
}

// Column-parallel output [n, N_r] (or [n, N_r * tp]), all rows valid.
// `linear_of(sharded)` builds the GEMM of x's rows: all of them, or this rank's
// padded block when sharded.
template <typename MakeLinear>
at::Tensor column_parallel(const ModeCall& mc, OpId compact_op, const at::Tensor& x, int64_t N_r,
                           c10::ScalarType key_dtype, int64_t threshold, bool gather_output,
                           const MakeLinear& linear_of) {
  const comm::Group& g = mc.group;
  const int64_t n = x.size(0);
  at::Tensor local;
  comm::CallInfo info = mc.info;
  if (mc.mode == Mode::kReplicated && bitwise(g)) {
    // Bitwise mode invariance: the GEMM gets the row blocks the sharded path gives it
    // (one call over every row on c10d when the sharded path gathers in one step).
    const core::Strategy s = ops::decide_strategy(compact_op, g, n, x.size(1), N_r, key_dtype,
                                                  threshold, /*enabled=*/true, /*record=*/false);
    local = ops::local_gemm_as_gathered(g, s, n, linear_of(/*sharded=*/false));
  } else if (mc.mode == Mode::kReplicated) {
    local = ops::run_local(linear_of(/*sharded=*/false));
  } else {
    const core::Strategy s = ops::decide_strategy(compact_op, g, n, x.size(1), N_r, key_dtype,
                                                  threshold, /*enabled=*/true);
    info.strategy = static_cast<int8_t>(s);
    local = ops::all_gather_gemm(g, s, n, linear_of(/*sharded=*/true), info);
  }
  return gather_output ? ops::gather_output_features(g, local, info) : local;
}

}  // namespace

at::Tensor sp_row_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const GroupPtr& group,
                         int64_t sp_threshold, bool enabled, int64_t threshold) {
  ops::check_linear("sp_row_linear", x, weight, bias, /*w8a8=*/false, "[n, K_r]", "[N, K_r]");
  const ModeCall mc = decide_mode(OpId::kSpRowLinear, group, x.device(), x.size(0), sp_threshold,
                                  enabled, threshold);
  return row_parallel(mc, static_cast<int>(OpId::kGemmRs),
                      ops::fp_row_linear(x, weight, bias, mc.group.rank() == 0), x.size(1),
                      x.scalar_type(), threshold);
}

at::Tensor sp_row_linear_w8a8(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& weight_scale,
                              const std::optional<at::Tensor>& input_scale,
                              const std::optional<at::Tensor>& input_zero_point,
                              const std::optional<at::Tensor>& bias, const GroupPtr& group,
                              c10::ScalarType out_dtype, int64_t sp_threshold, bool enabled,
                              int64_t threshold) {
  constexpr const char* kOp = "sp_row_linear_w8a8";
  ops::check_linear(kOp, x, weight, bias, /*w8a8=*/true, "[n, K_r]", "[N, K_r]");
  ops::check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  const ModeCall mc = decide_mode(OpId::kSpRowLinearW8A8, group, x.device(), x.size(0),
                                  sp_threshold, enabled, threshold);
  return row_parallel(mc, static_cast<int>(OpId::kGemmRsW8A8),
                      ops::w8a8_row_linear(x, weight, weight_scale, input_scale, input_zero_point,
                                           bias, mc.group.rank() == 0, out_dtype),
                      x.size(1), at::kChar, threshold);
}

at::Tensor sp_column_linear(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const GroupPtr& group,
                            int64_t sp_threshold, bool enabled, int64_t threshold,
                            bool gather_output) {
  ops::check_linear("sp_column_linear", x, weight, bias, /*w8a8=*/false, "[n, K]", "[N_r, K]");
  const ModeCall mc = decide_mode(OpId::kSpColumnLinear, group, x.device(), x.size(0),
                                  sp_threshold, enabled, threshold);
  return column_parallel(mc, OpId::kAgGemm, x, weight.size(0), x.scalar_type(), threshold,
                         gather_output, [&](bool sharded) {
                           const at::Tensor rows = sharded ? owned_block(x, mc.group) : x;
                           return ops::fp_column_linear(rows, weight, bias);
                         });
}

at::Tensor sp_column_linear_w8a8(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& input_scale,
                                 const std::optional<at::Tensor>& input_zero_point,
                                 const std::optional<at::Tensor>& bias, const GroupPtr& group,
                                 c10::ScalarType out_dtype, int64_t sp_threshold, bool enabled,
                                 int64_t threshold, bool gather_output) {
  constexpr const char* kOp = "sp_column_linear_w8a8";
  ops::check_linear(kOp, x, weight, bias, /*w8a8=*/true, "[n, K]", "[N_r, K]");
  ops::check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  const ModeCall mc = decide_mode(OpId::kSpColumnLinearW8A8, group, x.device(), x.size(0),
                                  sp_threshold, enabled, threshold);
  return column_parallel(mc, OpId::kAgGemmW8A8, x, weight.size(0), at::kChar, threshold,
                         gather_output, [&](bool sharded) {
                           if (!sharded) {
                             return ops::w8a8_column_linear(x, weight, weight_scale, input_scale,
                                                            input_zero_point, bias, out_dtype);
                           }
                           // Per-token scales of an int8 x travel with their rows.
                           std::optional<at::Tensor> scale = input_scale;
                           if (scale.has_value() && scale->dim() == 2)
                             scale = owned_block(*scale, mc.group);
                           return ops::w8a8_column_linear(owned_block(x, mc.group), weight,
                                                          weight_scale, scale, input_zero_point,
                                                          bias, out_dtype);
                         });
}

namespace {

// The norm of the rows this rank computes (all, or the owned ones) into normed and
// residual_out (which may be x and residual themselves: the kernel reads each element
// before it writes it); with `gather`, sharded mode then all-gathers the owned rows
// of normed so every row is valid.
void norm_into(const ModeCall& mc, const at::Tensor& x, const std::optional<at::Tensor>& residual,
               const at::Tensor& weight, double eps, bool gather, at::Tensor normed,
               at::Tensor residual_out) {
  const int64_t n = x.size(0);
  const RowRange rows = mc.mode == Mode::kReplicated ? RowRange{0, n} : owned(mc.group, n);
  auto slice = [&](const at::Tensor& t) { return ops::row_range(t, rows.begin, rows.size()); };
  if (rows.size() > 0) {
    const std::optional<at::Tensor> residual_rows =
        residual.has_value() ? std::optional<at::Tensor>(slice(*residual)) : std::nullopt;
    ops::add_rms_norm_rows(slice(x), residual_rows, weight, eps, slice(normed),
                           slice(residual_out));
  }
  poison_outside(residual_out, rows);
  if (mc.mode == Mode::kSharded && gather) {
    // The final norm, and every boundary norm in front of an engine's own column
    // GEMM: every row valid everywhere.
    ops::gather_owned_rows(mc.group, normed, mc.info);
  } else {
    poison_outside(normed, rows);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sp_add_rms_norm(const at::Tensor& x,
                                                   const std::optional<at::Tensor>& residual,
                                                   const at::Tensor& weight, double eps,
                                                   const GroupPtr& group, int64_t sp_threshold,
                                                   bool enabled, bool gather) {
  ops::check_norm("sp_add_rms_norm", x, residual, weight);
  const ModeCall mc = decide_mode(OpId::kSpAddRmsNorm, group, x.device(), x.size(0),
                                  sp_threshold, enabled, /*threshold=*/-1);
  at::Tensor normed = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = at::empty(x.sizes(), x.options());
  norm_into(mc, x, residual, weight, eps, gather, normed, residual_out);
  return {normed, residual_out};
}

void sp_add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps,
                      const GroupPtr& group, int64_t sp_threshold, bool enabled, bool gather) {
  ops::check_norm_inplace("sp_add_rms_norm_", x, residual, weight);
  const ModeCall mc = decide_mode(OpId::kSpAddRmsNorm, group, x.device(), x.size(0),
                                  sp_threshold, enabled, /*threshold=*/-1);
  norm_into(mc, x, residual, weight, eps, gather, x, residual);
}

namespace {

// The partial rows travel as they are: the engines' "GEMM" is a copy into the
// transport's buffer (shm: this rank's slot; c10d: the output, reduced in place).
ops::RowLinear partial_rows(const at::Tensor& partial) {
  ops::RowLinear copy;
  copy.n = partial.size(0);
  copy.out_features = partial.size(1);
  copy.out_options = partial.options();
  copy.gemm = [partial](int64_t row_begin, int64_t rows, at::Tensor& out) {
    const at::Tensor src = ops::row_range(partial, row_begin, rows);
    if (src.data_ptr() != out.data_ptr()) ops::copy_rows(out, src);
  };
  return copy;
}

}  // namespace

at::Tensor sp_reduce(const at::Tensor& partial, const GroupPtr& group, int64_t sp_threshold,
                     bool enabled) {
  ops::check_partial("sp_reduce", partial);
  const ModeCall mc = decide_mode(OpId::kSpReduce, group, partial.device(), partial.size(0),
                                  sp_threshold, enabled, /*threshold=*/-1);
  return row_parallel(mc, /*compact_op=*/-1, partial_rows(partial), partial.size(1),
                      partial.scalar_type(), /*threshold=*/-1);
}

void sp_reduce_(at::Tensor& partial, const GroupPtr& group, int64_t sp_threshold, bool enabled) {
  ops::check_partial_inplace("sp_reduce_", partial);
  const ModeCall mc = decide_mode(OpId::kSpReduce, group, partial.device(), partial.size(0),
                                  sp_threshold, enabled, /*threshold=*/-1);
  row_parallel(mc, /*compact_op=*/-1, partial_rows(partial), partial.size(1),
               partial.scalar_type(), /*threshold=*/-1, partial);
}

at::Tensor sp_gather(const at::Tensor& x, const GroupPtr& group, int64_t sp_threshold,
                     bool enabled) {
  ops::check_partial("sp_gather", x, "x");
  const ModeCall mc = decide_mode(OpId::kSpGather, group, x.device(), x.size(0), sp_threshold,
                                  enabled, /*threshold=*/-1);
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  if (mc.mode == Mode::kSharded) ops::gather_owned_rows(mc.group, out, mc.info);
  return out;
}

void sp_gather_(at::Tensor& x, const GroupPtr& group, int64_t sp_threshold, bool enabled) {
  ops::check_partial_inplace("sp_gather_", x, "x");
  const ModeCall mc = decide_mode(OpId::kSpGather, group, x.device(), x.size(0), sp_threshold,
                                  enabled, /*threshold=*/-1);
  if (mc.mode == Mode::kSharded) ops::gather_owned_rows(mc.group, x, mc.info);
}

namespace ops {

at::Tensor sp_row_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const GroupPtr&, int64_t,
                              bool, int64_t) {
  check_linear("sp_row_linear", x, weight, bias, false, "[n, K_r]", "[N, K_r]");
  return at::empty_symint({x.sym_size(0), weight.sym_size(0)}, x.options());
}

at::Tensor sp_row_linear_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& weight_scale,
                                   const std::optional<at::Tensor>& input_scale,
                                   const std::optional<at::Tensor>& input_zero_point,
                                   const std::optional<at::Tensor>& bias, const GroupPtr&,
                                   c10::ScalarType out_dtype, int64_t, bool, int64_t) {
  constexpr const char* kOp = "sp_row_linear_w8a8";
  check_linear(kOp, x, weight, bias, true, "[n, K_r]", "[N, K_r]");
  check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  return at::empty_symint({x.sym_size(0), weight.sym_size(0)}, x.options().dtype(out_dtype));
}

at::Tensor sp_column_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const GroupPtr& group,
                                 int64_t, bool, int64_t, bool gather_output) {
  check_linear("sp_column_linear", x, weight, bias, false, "[n, K]", "[N_r, K]");
  const int64_t tp = group->getSize();
  return at::empty_symint(
      {x.sym_size(0), gather_output ? weight.sym_size(0) * tp : weight.sym_size(0)}, x.options());
}

at::Tensor sp_column_linear_w8a8_meta(const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& weight_scale,
                                      const std::optional<at::Tensor>& input_scale,
                                      const std::optional<at::Tensor>& input_zero_point,
                                      const std::optional<at::Tensor>& bias, const GroupPtr& group,
                                      c10::ScalarType out_dtype, int64_t, bool, int64_t,
                                      bool gather_output) {
  constexpr const char* kOp = "sp_column_linear_w8a8";
  check_linear(kOp, x, weight, bias, true, "[n, K]", "[N_r, K]");
  check_w8a8_scales(kOp, x, weight, weight_scale, input_scale, input_zero_point, out_dtype);
  const int64_t tp = group->getSize();
  return at::empty_symint(
      {x.sym_size(0), gather_output ? weight.sym_size(0) * tp : weight.sym_size(0)},
      x.options().dtype(out_dtype));
}

std::tuple<at::Tensor, at::Tensor> sp_add_rms_norm_meta(const at::Tensor& x,
                                                        const std::optional<at::Tensor>& residual,
                                                        const at::Tensor& weight, double,
                                                        const GroupPtr&, int64_t, bool, bool) {
  check_norm("sp_add_rms_norm", x, residual, weight);
  return {at::empty_symint(x.sym_sizes(), x.options()),
          at::empty_symint(x.sym_sizes(), x.options())};
}

at::Tensor sp_reduce_meta(const at::Tensor& partial, const GroupPtr&, int64_t, bool) {
  check_partial("sp_reduce", partial);
  return at::empty_symint(partial.sym_sizes(), partial.options());
}

void sp_add_rms_norm_meta_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double,
                           const GroupPtr&, int64_t, bool, bool) {
  check_norm_inplace("sp_add_rms_norm_", x, residual, weight);
}

void sp_reduce_meta_(at::Tensor& partial, const GroupPtr&, int64_t, bool) {
  check_partial_inplace("sp_reduce_", partial);
}

at::Tensor sp_gather_meta(const at::Tensor& x, const GroupPtr&, int64_t, bool) {
  check_partial("sp_gather", x, "x");
  return at::empty_symint(x.sym_sizes(), x.options());
}

void sp_gather_meta_(at::Tensor& x, const GroupPtr&, int64_t, bool) {
  check_partial_inplace("sp_gather_", x, "x");
}

void set_debug_poison_for_testing_op(bool on) {
  g_poison.store(on ? 1 : 0, std::memory_order_relaxed);
}

}  // namespace ops
}  // namespace flashcomm
