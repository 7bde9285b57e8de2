#include "comm/c10d_transport.h"

#include <sstream>
#include <utility>
#include <vector>

#include "comm/c10d_compat.h"
#include "comm/fingerprint.h"

namespace flashcomm::comm {

namespace {

using Work = c10::intrusive_ptr<c10d::Work>;

class C10dTransport;

// Waits for `work`; a failure or timeout is rethrown naming the op and group.
void wait_work(const Work& work, const CallInfo& call, const c10d::ProcessGroup& pg,
               const std::string& name) {
  if (!work) return;
  try {
    work->wait();
  } catch (const std::exception& e) {
    fail_collective(call.op, name, pg.getSize(), pg.getRank(), "", e);
  }
}

class C10dTransport final : public Transport {
 public:
  C10dTransport(ProcessGroupPtr pg, std::string name, const C10dOptions& options)
      : pg_(std::move(pg)), name_(std::move(name)), options_(options) {}

  const char* name() const override { return "c10d"; }
  int max_in_flight() const override { return 1 << 20; }
  int64_t step_capacity() const override { return 0; }

  void all_reduce(at::Tensor& t, const CallInfo& call) override {
    check(Collective::kAllReduce, t, call);
    wait(start_all_reduce(t), call);
  }

  void reduce_scatter(at::Tensor& out, const at::Tensor& in, const CallInfo& call) override {
    check(Collective::kReduceScatter, in, call);
    wait(start_reduce_scatter(out, in), call);
  }

  void all_gather(at::Tensor& out, const at::Tensor& in, const CallInfo& call) override {
    check(Collective::kAllGather, in, call);
    wait(start_all_gather(out, in), call);
  }

  std::unique_ptr<ReduceStep> reduce_scatter_step(at::Tensor out, const CallInfo& call,
                                                  int piece) override;
  std::unique_ptr<ReduceStep> all_reduce_step(at::Tensor out, const CallInfo& call,
                                              int piece) override;
  std::unique_ptr<GatherStep> all_gather_step(int64_t block_rows, int64_t cols,
                                              const at::TensorOptions& options,
                                              const CallInfo& call, int piece) override;

  // With FLASHCOMM_DEBUG_CHECK=1: the ranks compare this collective's fingerprint
  // first (one small all-gather), so a divergence is an error on every rank.
  void check(Collective kind, const at::Tensor& t, const CallInfo& call) {
    const uint64_t seq = ++calls_;
    if (!options_.debug_check) return;
    const Fingerprint mine = make_fingerprint(kind, t, call, seq);
    const std::vector<int64_t> words = mine.to_words();
    const int64_t count = static_cast<int64_t>(words.size());
    at::Tensor local = at::tensor(words, at::TensorOptions().dtype(at::kLong)).to(t.device());
    at::Tensor all = at::empty({pg_->getSize() * count}, local.options());
    wait(start_all_gather(all, local), call);
    all = all.cpu();
    std::vector<Fingerprint> by_rank;
    for (int64_t r = 0; r < pg_->getSize(); ++r) {
      by_rank.push_back(Fingerprint::from_words(all.data_ptr<int64_t>() + r * count));
    }
    const std::string diff = describe_fingerprint_mismatch(by_rank);
    TORCH_CHECK(diff.empty(), call.op, ": the ranks of group '", name_,
                "' issued different collectives (FLASHCOMM_DEBUG_CHECK): ", diff);
  }

  Work start_all_reduce(at::Tensor& t) {
    std::vector<at::Tensor> tensors{t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    return pg_->allreduce(tensors, opts);
  }

  Work start_reduce_scatter(at::Tensor& out, const at::Tensor& in) {
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    at::Tensor input = in;
    return compat::reduce_scatter_single(*pg_, out, input, opts);
  }

  Work start_all_gather(at::Tensor& out, const at::Tensor& in) {
    at::Tensor input = in;
    return compat::all_gather_single(*pg_, out, input, c10d::AllgatherOptions());
  }

  void wait(const Work& work, const CallInfo& call) const { wait_work(work, call, *pg_, name_); }

  int64_t size() const { return pg_->getSize(); }

 private:
  ProcessGroupPtr pg_;
  std::string name_;
  C10dOptions options_;
  uint64_t calls_ = 0;  // collectives issued on this group (fingerprints)
};

// Reduce-scatter / all-reduce of one chunk: a fresh send buffer (all-reduce: the
// output itself, summed in place), an async collective, a wait.
class C10dReduceStep final : public ReduceStep {
 public:
  C10dReduceStep(C10dTransport& t, at::Tensor out, CallInfo call, bool scatter)
      : t_(t), out_(std::move(out)), call_(call), scatter_(scatter) {}

  at::Tensor send_buffer() override {
    if (!send_.defined()) {
      if (scatter_) {
        std::vector<int64_t> sizes = out_.sizes().vec();
        sizes[0] *= t_.size();
        send_ = at::empty(sizes, out_.options());
      } else {
        send_ = out_;
      }
    }
    return send_;
  }

  void start() override {
    if (scatter_) {
      t_.check(Collective::kReduceScatter, send_buffer(), call_);
      work_ = t_.start_reduce_scatter(out_, send_);
    } else {
      t_.check(Collective::kAllReduce, out_, call_);
      work_ = t_.start_all_reduce(out_);
    }
  }

  void wait() override {
    t_.wait(work_, call_);
    work_.reset();
    send_ = at::Tensor();  // the send buffer must outlive its collective, no longer
  }

 private:
  C10dTransport& t_;
  at::Tensor out_;
  at::Tensor send_;
  CallInfo call_;
  bool scatter_;
  Work work_;
};

class C10dGatherStep final : public GatherStep {
 public:
  C10dGatherStep(C10dTransport& t, int64_t rows, int64_t cols, at::TensorOptions options,
                 CallInfo call)
      : t_(t), rows_(rows), cols_(cols), options_(options), call_(call) {}

  at::Tensor send_buffer() override {
    if (!send_.defined()) send_ = at::empty({rows_, cols_}, options_);
    return send_;
  }

  void start(const at::Tensor* rows) override {
    if (rows != nullptr) send_ = *rows;  // sent in place
    at::Tensor send = send_buffer();
    recv_ = at::empty({t_.size() * rows_, cols_}, options_);
    t_.check(Collective::kAllGather, send, call_);
    work_ = t_.start_all_gather(recv_, send);
  }

  at::Tensor block(int64_t d) override {
    if (work_) {
      t_.wait(work_, call_);
      work_.reset();
      send_ = at::Tensor();
    }
    return recv_.narrow(0, d * rows_, rows_);
  }

  at::Tensor gathered() override {
    block(0);  // waits
    return recv_;
  }

  void finish() override {
    if (work_) t_.wait(work_, call_);
    work_.reset();
    send_ = recv_ = at::Tensor();
  }

 private:
  C10dTransport& t_;
  int64_t rows_, cols_;
  at::TensorOptions options_;
  CallInfo call_;
  at::Tensor send_, recv_;
  Work work_;
};

std::unique_ptr<ReduceStep> C10dTransport::reduce_scatter_step(at::Tensor out,
                                                               const CallInfo& call, int) {
  return std::make_unique<C10dReduceStep>(*this, std::move(out), call, /*scatter=*/true);
}

std::unique_ptr<ReduceStep> C10dTransport::all_reduce_step(at::Tensor out, const CallInfo& call,
                                                           int) {
  return std::make_unique<C10dReduceStep>(*this, std::move(out), call, /*scatter=*/false);
}

std::unique_ptr<GatherStep> C10dTransport::all_gather_step(int64_t block_rows, int64_t cols,
                                                           const at::TensorOptions& options,
                                                           const CallInfo& call, int) {
  return std::make_unique<C10dGatherStep>(*this, block_rows, cols, options, call);
}

}  // namespace

std::unique_ptr<Transport> make_c10d_transport(const ProcessGroupPtr& pg, std::string group_name,
                                               const C10dOptions& options) {
  return std::make_unique<C10dTransport>(pg, std::move(group_name), options);
}

}  // namespace flashcomm::comm
