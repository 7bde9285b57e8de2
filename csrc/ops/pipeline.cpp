#include "ops/pipeline.h"

#include <vector>

#include "core/shard.h"
#include "ops/checks.h"

namespace flashcomm::ops {

core::Strategy decide_strategy(core::OpId op, int64_t n_global, int64_t K, int64_t N, int64_t tp,
                               c10::ScalarType dtype, int64_t threshold, bool enabled) {
  const core::ShapeKey key{core::op_name(op), K, N, tp, dtype_key(dtype)};
  const core::Strategy s =
      core::choose_strategy(n_global, tp, core::resolve_threshold(threshold, key), enabled);
  core::Stats::instance().record(op, s);
  return s;
}

at::Tensor gemm_reduce_scatter(const char* op, const comm::Group& group, core::Strategy strategy,
                               const RowLinear& linear, at::Tensor out) {
  const int64_t tp = group->getSize();
  const int64_t n = linear.n, N = linear.out_features;
  const at::TensorOptions& out_options = linear.out_options;
  const RowGemm& gemm = linear.gemm;
  const int64_t c = core::shard_rows(n, tp);
  if (!out.defined()) out = at::empty({c, N}, out_options);
  TORCH_INTERNAL_ASSERT(out.size(0) == c && out.size(1) == N && out.is_contiguous());
  if (tp == 1) {
    if (n > 0) gemm(0, n, out);
    return out;
  }
  // n is rank-invariant, so either every rank skips the collective or none does.
  if (n == 0) return out;

  if (strategy == core::Strategy::kSequential) {
    at::Tensor send = at::empty({tp * c, N}, out_options);
    at::Tensor valid = send.narrow(0, 0, n);
    gemm(0, n, valid);
    const int64_t pad = core::pad_rows(n, tp);
    if (pad > 0) send.narrow(0, n, pad).zero_();
    comm::wait(comm::reduce_scatter(out, send, group), op, group);
    return out;
  }

  // Chunk i's send buffer holds block rows [lo, hi) of every rank block d at
  // rows [d*len, d*len + len); the reduce-scatter delivers their sum over ranks
  // for block r to out rows [lo, hi) on rank r.
  const core::PipelineConfig cfg = core::pipeline_config();
  const auto chunks = core::plan_chunks(c, cfg.max_chunks, cfg.min_chunk_rows);
  std::vector<comm::Work> works;
  std::vector<at::Tensor> in_flight;  // send buffers must outlive their collective
  works.reserve(chunks.size());
  in_flight.reserve(chunks.size());
  for (const core::RowRange& chunk : chunks) {
    const int64_t len = chunk.size();
    at::Tensor send = at::empty({tp * len, N}, out_options);
    for (int64_t d = 0; d < tp; ++d) {
      const int64_t rows = core::valid_rows_in_block(n, tp, d, chunk.begin, chunk.end);
      if (rows > 0) {
        at::Tensor dst = send.narrow(0, d * len, rows);
        gemm(d * c + chunk.begin, rows, dst);
      }
      if (rows < len) send.narrow(0, d * len + rows, len - rows).zero_();
    }
    at::Tensor recv = out.narrow(0, chunk.begin, len);
    works.push_back(comm::reduce_scatter(recv, send, group));
    in_flight.push_back(std::move(send));
  }
  for (const auto& w : works) comm::wait(w, op, group);
  return out;
}

at::Tensor gemm_all_reduce(const char* op, const comm::Group& group, const RowLinear& linear) {
  at::Tensor out = at::empty({linear.n, linear.out_features}, linear.out_options);
  if (linear.n == 0) return out;  // rank-invariant: every rank skips the collective
  linear.gemm(0, linear.n, out);
  if (group->getSize() > 1) comm::wait(comm::all_reduce(out, group), op, group);
  return out;
}

at::Tensor all_gather_gemm(const char* op, const comm::Group& group, core::Strategy strategy,
                           int64_t n, const ColumnLinear& linear) {
  const int64_t tp = group->getSize();
  const GatheredGemm& gemm = linear.gemm;
  at::Tensor out = at::empty({n, linear.out_features}, linear.out_options);
  if (n == 0) return out;  // rank-invariant: every rank skips the collective
  if (tp == 1) {
    gemm(materialize_payload(linear), out);
    return out;
  }
  const int64_t c = core::shard_rows(n, tp);
  at::Tensor shard = materialize_payload(linear);
  std::vector<int64_t> gathered_sizes = shard.sizes().vec();

  if (strategy == core::Strategy::kSequential) {
    gathered_sizes[0] = tp * c;
    at::Tensor gathered = at::empty(gathered_sizes, shard.options());
    comm::wait(comm::all_gather(gathered, shard, group), op, group);
    gemm(gathered.narrow(0, 0, n), out);
    return out;
  }

  const core::PipelineConfig cfg = core::pipeline_config();
  const auto chunks = core::plan_chunks(c, cfg.max_chunks, cfg.min_chunk_rows);
  std::vector<comm::Work> works;
  std::vector<at::Tensor> sends, recvs;
  for (const core::RowRange& chunk : chunks) {
    at::Tensor send = shard.narrow(0, chunk.begin, chunk.size());
    gathered_sizes[0] = tp * chunk.size();
    at::Tensor recv = at::empty(gathered_sizes, shard.options());
    works.push_back(comm::all_gather(recv, send, group));
    sends.push_back(std::move(send));
    recvs.push_back(std::move(recv));
  }
  // recv of chunk i holds block rows [lo, hi) of rank block d at rows
  // [d*len, d*len + len); their real rows go to global rows d*c + lo + ...
  for (size_t i = 0; i < chunks.size(); ++i) {
    comm::wait(works[i], op, group);
    const int64_t len = chunks[i].size();
    for (int64_t d = 0; d < tp; ++d) {
      const int64_t rows = core::valid_rows_in_block(n, tp, d, chunks[i].begin, chunks[i].end);
      if (rows == 0) continue;
      at::Tensor dst = out.narrow(0, d * c + chunks[i].begin, rows);
      gemm(recvs[i].narrow(0, d * len, rows), dst);
    }
  }
  return out;
}

at::Tensor gather_output_features(const char* op, const comm::Group& group,
                                  const at::Tensor& local) {
  const int64_t tp = group->getSize();
  if (tp == 1) return local;
  const int64_t n = local.size(0);
  const int64_t N_r = local.size(1);
  if (n == 0) return at::empty({0, N_r * tp}, local.options());
  at::Tensor shard = local.contiguous();
  at::Tensor gathered = at::empty({tp * n, N_r}, local.options());
  comm::wait(comm::all_gather(gathered, shard, group), op, group);
  return gathered.view({tp, n, N_r}).permute({1, 0, 2}).reshape({n, tp * N_r});
}

}  // namespace flashcomm::ops
