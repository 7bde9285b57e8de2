#include "ops/pipeline.h"

#include <algorithm>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/shard.h"
#include "ops/checks.h"

namespace flashcomm::ops {

using core::RowRange;

core::Strategy decide_strategy(core::OpId op, const comm::Group& group, int64_t n_global,
                               int64_t K, int64_t N, c10::ScalarType dtype, int64_t threshold,
                               bool enabled, bool record) {
  int64_t resolved = threshold;
  if (resolved < 0) {
    resolved = core::resolve_threshold(
        threshold, core::ShapeKey{core::op_name(op), K, N, group.size(), dtype_key(dtype)});
  }
  const core::Strategy s =
      core::choose_strategy(n_global, group.size(), resolved, enabled, group.collective());
  if (record) core::Stats::instance().record(op, s);
  return s;
}

namespace {

// The steps of one call over a rank block of c rows: the strategy's chunks, each
// cut into near-equal pieces that fit the transport's step capacity when every
// block row adds `row_bytes` to a step.
std::vector<RowRange> plan_steps(const comm::Group& group, core::Strategy strategy, int64_t c,
                                 int64_t row_bytes, const char* op) {
  std::vector<RowRange> chunks;
  if (strategy == core::Strategy::kPipelined) {
    const core::PipelineConfig cfg = core::pipeline_config();
    chunks = core::plan_chunks(c, cfg.max_chunks, cfg.min_chunk_rows);
  } else if (c > 0) {
    chunks.push_back({0, c});
  }
  const int64_t capacity = group.transport().step_capacity();
  if (capacity == 0) return chunks;
  const int64_t max_rows = capacity / row_bytes;
  TORCH_CHECK(max_rows >= 1, op, ": one row of this collective (", row_bytes,
              " bytes over the group) does not fit the ", group.transport().name(),
              " transport's step of ", capacity,
              " bytes; raise FLASHCOMM_SHM_BYTES or use FLASHCOMM_TRANSPORT=c10d");
  std::vector<RowRange> steps;
  for (const RowRange& chunk : chunks) {
    const int64_t pieces = core::ceil_div(chunk.size(), max_rows);
    const std::vector<RowRange> split = core::plan_chunks(chunk.size(), pieces, 1);
    for (const RowRange& p : split) steps.push_back({chunk.begin + p.begin, chunk.begin + p.end});
  }
  return steps;
}

// Keeps at most `window` steps started and not yet completed; `complete` finishes
// the oldest. Every rank runs the same sequence, so the transports' own limits
// (shm: two buffers) are respected identically everywhere.
template <typename Step, typename Complete>
class Window {
 public:
  Window(int window, Complete complete) : window_(window), complete_(std::move(complete)) {}
  void push(Step step) {
    pending_.push_back(std::move(step));
    if (static_cast<int>(pending_.size()) >= window_) pop();
  }
  void drain() {
    while (!pending_.empty()) pop();
  }

 private:
  void pop() {
    complete_(pending_.front());
    pending_.pop_front();
  }
  int window_;
  Complete complete_;
  std::deque<Step> pending_;
};

template <typename Step, typename Complete>
Window<Step, Complete> make_window(int window, Complete complete) {
  return Window<Step, Complete>(window, std::move(complete));
}

// Runs `fn`, the caller's part of a step (its GEMM, its copy), while the step is begun and
// unfinished: a failure aborts the group's transport with its cause before the step goes, so
// the peers fail fast quoting it.
template <typename Fn>
void in_step(const comm::Group& group, const comm::CallInfo& call, Fn&& fn) {
  comm::abort_on_error(group.transport(), call.op, group.rank(), std::forward<Fn>(fn));
}

}  // namespace

void gemm_reduce_scatter(const comm::Group& group, core::Strategy strategy,
                         const RowLinear& linear, at::Tensor out, const comm::CallInfo& call) {
  const int64_t tp = group.size();
  const int64_t n = linear.n, N = linear.out_features;
  const RowGemm& gemm = linear.gemm;
  const int64_t c = core::shard_rows(n, tp);
  TORCH_INTERNAL_ASSERT(out.size(0) == (group.collective() ? c : n) && out.size(1) == N &&
                        out.is_contiguous());
  if (!group.collective()) {
    if (n > 0) gemm(0, n, out);
    return;
  }
  // n is rank-invariant, so either every rank skips the collective or none does.
  if (n == 0) return;

  const std::vector<RowRange> steps =
      plan_steps(group, strategy, c, tp * N * out.element_size(), call.op);
  auto window = make_window<std::unique_ptr<comm::ReduceStep>>(
      group.transport().max_in_flight(), [](std::unique_ptr<comm::ReduceStep>& s) { s->wait(); });
  int piece = 0;
  for (const RowRange& step_rows : steps) {
    const int64_t len = step_rows.size();
    auto step = group.transport().reduce_scatter_step(out.narrow(0, step_rows.begin, len), call,
                                                      piece++);
    // The send buffer holds block rows [lo, hi) of every rank block d at rows
    // [d*len, d*len + len); the step delivers their sum over ranks for block r
    // to out rows [lo, hi) on rank r. Padding rows (global row >= n) are zero.
    in_step(group, call, [&] {
      comm::debug_throw_if(comm::debug_throw(group), comm::DebugThrow::kGemm);
      at::Tensor send = step->send_buffer();
      if (len == c) {
        // The whole block: the send layout is the global row order.
        at::Tensor valid = send.narrow(0, 0, n);
        gemm(0, n, valid);
        if (tp * c > n) send.narrow(0, n, tp * c - n).zero_();
      } else {
        for (int64_t d = 0; d < tp; ++d) {
          const int64_t rows =
              core::valid_rows_in_block(n, tp, d, step_rows.begin, step_rows.end);
          if (rows > 0) {
            at::Tensor dst = send.narrow(0, d * len, rows);
            gemm(d * c + step_rows.begin, rows, dst);
          }
          if (rows < len) send.narrow(0, d * len + rows, len - rows).zero_();
        }
      }
    });
    step->start();
    window.push(std::move(step));
  }
  window.drain();
}

void gemm_all_reduce(const comm::Group& group, const RowLinear& linear, at::Tensor out,
                     const comm::CallInfo& call) {
  const int64_t n = linear.n, N = linear.out_features;
  TORCH_INTERNAL_ASSERT(out.size(0) == n && out.size(1) == N && out.is_contiguous());
  if (n == 0) return;  // rank-invariant: every rank skips the collective
  if (!group.collective() || comm::has_all_reduce_provider(group)) {
    linear.gemm(0, n, out);
    if (group.collective()) comm::all_reduce(group, out, call);
    return;
  }
  // The GEMM writes each step's partial straight into the transport's buffer
  // (c10d: `out` itself, summed in place; shm: this rank's slot).
  const std::vector<RowRange> steps =
      plan_steps(group, core::Strategy::kSequential, n, N * out.element_size(), call.op);
  auto window = make_window<std::unique_ptr<comm::ReduceStep>>(
      group.transport().max_in_flight(), [](std::unique_ptr<comm::ReduceStep>& s) { s->wait(); });
  int piece = 0;
  for (const RowRange& rows : steps) {
    auto step = group.transport().all_reduce_step(row_range(out, rows.begin, rows.size()), call,
                                                  piece++);
    in_step(group, call, [&] {
      comm::debug_throw_if(comm::debug_throw(group), comm::DebugThrow::kGemm);
      at::Tensor send = step->send_buffer();
      linear.gemm(rows.begin, rows.size(), send);
    });
    step->start();
    window.push(std::move(step));
  }
  window.drain();
}

at::Tensor all_gather_gemm(const comm::Group& group, core::Strategy strategy, int64_t n,
                           const ColumnLinear& linear, const comm::CallInfo& call,
                           at::Tensor out) {
  const int64_t tp = group.size();
  const GatheredGemm& gemm = linear.gemm;
  if (!out.defined()) out = at::empty({n, linear.out_features}, linear.out_options);
  TORCH_INTERNAL_ASSERT(out.size(0) == n && out.is_contiguous());
  if (n == 0) return out;  // rank-invariant: every rank skips the collective
  if (!group.collective()) {
    gemm(materialize_payload(linear), out);
    return out;
  }
  const int64_t c = core::shard_rows(n, tp);
  TORCH_INTERNAL_ASSERT(linear.rows == c, "all_gather_gemm: payload has ", linear.rows,
                        " rows, expected ", c);
  const at::TensorOptions payload_options = linear.out_options.dtype(linear.payload_dtype);
  const int64_t row_bytes = linear.payload_cols * c10::elementSize(linear.payload_dtype);
  const std::vector<RowRange> steps = plan_steps(group, strategy, c, row_bytes, call.op);

  // Block rows [lo, hi) of rank block d go to global rows d*c + lo + ...; only the
  // real (non-padding) ones are computed.
  using Pending = std::pair<std::unique_ptr<comm::GatherStep>, RowRange>;
  auto window = make_window<Pending>(group.transport().max_in_flight(), [&](Pending& p) {
    comm::GatherStep& step = *p.first;
    const RowRange r = p.second;
    in_step(group, call, [&] {
      at::Tensor all = r.size() == c ? step.gathered() : at::Tensor();
      if (all.defined()) {
        gemm(all.narrow(0, 0, n), out);  // whole blocks, contiguous: global row order
      } else {
        for (int64_t d = 0; d < tp; ++d) {
          const int64_t rows = core::valid_rows_in_block(n, tp, d, r.begin, r.end);
          if (rows == 0) continue;
          at::Tensor dst = out.narrow(0, d * c + r.begin, rows);
          gemm(step.block(d).narrow(0, 0, rows), dst);
        }
      }
    });
    step.finish();
  });
  int piece = 0;
  for (const RowRange& r : steps) {
    auto step = group.transport().all_gather_step(r.size(), linear.payload_cols, payload_options,
                                                  call, piece++);
    at::Tensor rows =
        linear.payload.defined() ? linear.payload.narrow(0, r.begin, r.size()) : at::Tensor();
    if (rows.defined() && rows.is_contiguous()) {
      step->start(&rows);
    } else {
      in_step(group, call, [&] {
        at::Tensor buf = step->send_buffer();
        linear.write_payload(r.begin, r.size(), buf);
      });
      step->start();
    }
    window.push(Pending(std::move(step), r));
  }
  window.drain();
  return out;
}

bool row_gemm_in_one_call(const comm::Group& group, core::Strategy strategy, int64_t n, int64_t N,
                          int64_t element_size, const char* op) {
  if (!group.collective() || n == 0) return true;
  const int64_t tp = group.size(), c = core::shard_rows(n, tp);
  const std::vector<RowRange> scatter = plan_steps(group, strategy, c, tp * N * element_size, op);
  if (scatter.size() != 1 || scatter[0].size() != c) return false;
  // gemm_all_reduce: one call through a provider, else one per step of n rows; the
  // scatter's single step holds tp * c >= n rows, so the all-reduce's fits one step too.
  return true;
}

at::Tensor local_gemm_as_gathered(const comm::Group& group, core::Strategy strategy, int64_t n,
                                  const ColumnLinear& linear) {
  TORCH_INTERNAL_ASSERT(linear.rows == n);
  at::Tensor out = at::empty({n, linear.out_features}, linear.out_options);
  if (n == 0) return out;
  const at::Tensor payload = materialize_payload(linear);
  if (!group.collective()) {
    linear.gemm(payload, out);
    return out;
  }
  const int64_t tp = group.size(), c = core::shard_rows(n, tp);
  const int64_t row_bytes = linear.payload_cols * c10::elementSize(linear.payload_dtype);
  // all_gather_gemm runs one GEMM over every row where the transport delivers a
  // whole-block step into one buffer (GatherStep::gathered(): c10d), else one per
  // rank block of each step (shm: each block stays in its owner's slot).
  const bool one_buffer = std::string(group.transport().name()) == "c10d";
  for (const RowRange& r : plan_steps(group, strategy, c, row_bytes, "sp_column_linear")) {
    if (r.size() == c && one_buffer) {
      at::Tensor dst = out;
      linear.gemm(payload, dst);
      continue;
    }
    for (int64_t d = 0; d < tp; ++d) {
      const int64_t rows = core::valid_rows_in_block(n, tp, d, r.begin, r.end);
      if (rows == 0) continue;
      at::Tensor dst = out.narrow(0, d * c + r.begin, rows);
      linear.gemm(payload.narrow(0, d * c + r.begin, rows), dst);
    }
  }
  return out;
}

at::Tensor gather_output_features(const comm::Group& group, const at::Tensor& local,
                                  const comm::CallInfo& call) {
  const int64_t tp = group.size();
  if (!group.collective()) return local;
  const int64_t n = local.size(0);
  const int64_t N_r = local.size(1);
  if (n == 0) return at::empty({0, N_r * tp}, local.options());
  at::Tensor shard = local.contiguous();
  at::Tensor gathered = at::empty({tp * n, N_r}, local.options());
  group.transport().all_gather(gathered, shard, call);
  return gathered.view({tp, n, N_r}).permute({1, 0, 2}).reshape({n, tp * N_r});
}

void gather_owned_rows(const comm::Group& group, at::Tensor t, const comm::CallInfo& call) {
  const int64_t n = t.size(0), tp = group.size();
  // n is rank-invariant: every rank skips the collective or none does.
  if (!group.collective() || n == 0) return;
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && t.is_contiguous());
  const int64_t c = core::shard_rows(n, tp);
  const core::RowRange mine = core::owned_rows(n, tp, group.rank());
  // The "GEMM" of this gather is a copy: every rank's block lands in its rows of t
  // (this rank's own rows onto themselves).
  ColumnLinear copy;
  copy.rows = c;
  copy.payload_cols = t.size(1);
  copy.payload_dtype = t.scalar_type();
  if (mine.size() == c) copy.payload = t.narrow(0, mine.begin, c);
  copy.write_payload = [t, mine](int64_t row_begin, int64_t rows, at::Tensor& dst) {
    const int64_t valid = std::clamp<int64_t>(mine.size() - row_begin, 0, rows);
    if (valid > 0) dst.narrow(0, 0, valid).copy_(t.narrow(0, mine.begin + row_begin, valid));
    if (valid < rows) dst.narrow(0, valid, rows - valid).zero_();  // padding rows
  };
  // This rank's own rows are already in place in t: only the peers' blocks are copied.
  const auto* own_begin = static_cast<const uint8_t*>(t.data_ptr()) +
                          mine.begin * t.size(1) * t.element_size();
  const auto* own_end = own_begin + mine.size() * t.size(1) * t.element_size();
  copy.gemm = [own_begin, own_end](const at::Tensor& rows, at::Tensor& out) {
    const auto* dst = static_cast<const uint8_t*>(out.data_ptr());
    if (dst >= own_begin && dst + out.numel() * out.element_size() <= own_end) return;
    if (rows.data_ptr() != out.data_ptr()) out.copy_(rows);
  };
  copy.out_features = t.size(1);
  copy.out_options = t.options();
  all_gather_gemm(group, core::Strategy::kSequential, n, copy, call, t);
}

}  // namespace flashcomm::ops
