#include "comm/shm_transport.h"

#include <ATen/Parallel.h>
#include <c10/util/Logging.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "comm/c10d_transport.h"
#include "comm/fingerprint.h"
#include "core/agreement.h"
#include "core/settings.h"
#include "core/shm/channel.h"
#include "core/stats.h"
#include "kernels/cpu/reduce.h"

namespace flashcomm::comm {

namespace shm = core::shm;

namespace {

// A setting of the environment (core/settings.h); its error as this library's (c10::Error).
template <typename F>
auto checked(F read) -> decltype(read()) {
  try {
    return read();
  } catch (const core::settings::SettingError& e) {
    TORCH_CHECK(false, e.what());
  }
}

int64_t int_from_env(const char* name, int64_t fallback, int64_t lo, int64_t hi,
                     const char* expected) {
  return checked([&] { return core::settings::env_int(name, fallback, lo, hi, expected); });
}

}  // namespace

int64_t shm_bytes_from_env() {
  // Two slots of at most shm::kMaxSlotBytes each.
  return int_from_env("FLASHCOMM_SHM_BYTES", kDefaultShmBytes, int64_t{64} << 10,
                      2 * static_cast<int64_t>(shm::kMaxSlotBytes), "a number of bytes");
}

int64_t shm_two_shot_bytes_from_env() {
  return int_from_env("FLASHCOMM_SHM_TWO_SHOT_BYTES", -1, -1,
                      std::numeric_limits<int64_t>::max(),
                      "-1 (by group size), 0 (always) or a number of bytes");
}

int64_t shm_yield_us_from_env() {
  return int_from_env("FLASHCOMM_SHM_YIELD_US", kDefaultYieldUs, 0, 60'000'000,
                      "a number of microseconds (0: sleep at once)");
}

ShmSettings ShmSettings::from_env() {
  ShmSettings s;
  s.bytes = shm_bytes_from_env();
  s.two_shot_bytes = shm_two_shot_bytes_from_env();
  s.overlap = shm_overlap_from_env();
  s.yield_us = shm_yield_us_from_env();
  s.debug_throw = debug_throw_from_env();
  s.debug_unmappable =
      checked([] { return core::settings::env_bool("FLASHCOMM_DEBUG_SHM_UNMAPPABLE", false); });
  s.debug_die_after_create = checked(
      [] { return core::settings::env_bool("FLASHCOMM_DEBUG_SHM_DIE_AFTER_CREATE", false); });
  return s;
}

ShmOverlap shm_overlap_from_env() {
  const std::optional<bool> on =
      checked([] { return core::settings::env_auto_bool("FLASHCOMM_SHM_OVERLAP"); });
  if (!on) return ShmOverlap::kAuto;
  return *on ? ShmOverlap::kOn : ShmOverlap::kOff;
}

int64_t two_shot_threshold(int64_t setting, int64_t tp) {
  if (tp < 2) return std::numeric_limits<int64_t>::max();
  if (setting >= 0) return setting;
  return tp >= 3 ? kDefaultTwoShotBytes : std::numeric_limits<int64_t>::max();
}

namespace {

// The two phases of a two-shot all-reduce step, in the shared fingerprint's kind (bits
// 24..31), so a rank that ran one-shot against a peer's two-shot is reported, not misread.
enum Phase : uint32_t { kOneShot = 0, kScatterPhase = 1, kGatherPhase = 2 };

// Our fingerprint (fingerprint.h) in the protocol's fixed record: the collective,
// the caller's mode and strategy in `kind`; the op and its token count as tags.
shm::Fingerprint to_shm(const Fingerprint& f, int piece, Phase phase) {
  shm::Fingerprint s;
  s.kind = static_cast<uint32_t>(f.kind) | static_cast<uint32_t>(f.mode + 1) << 8 |
           static_cast<uint32_t>(f.strategy + 1) << 16 | static_cast<uint32_t>(phase) << 24;
  s.dtype = static_cast<uint32_t>(f.dtype);
  s.bytes = static_cast<uint64_t>(f.bytes);
  s.call = static_cast<uint64_t>(f.call);
  s.piece = static_cast<uint32_t>(piece);
  s.tag[0] = static_cast<uint64_t>(f.op);
  s.tag[1] = static_cast<uint64_t>(f.n);
  return s;
}

Fingerprint from_shm(const shm::Fingerprint& s) {
  Fingerprint f;
  f.kind = static_cast<Collective>(s.kind & 0xff);
  f.mode = static_cast<int64_t>((s.kind >> 8) & 0xff) - 1;
  f.strategy = static_cast<int64_t>((s.kind >> 16) & 0xff) - 1;
  f.dtype = s.dtype;
  f.bytes = static_cast<int64_t>(s.bytes);
  f.call = static_cast<int64_t>(s.call);
  f.op = static_cast<int64_t>(s.tag[0]);
  f.n = static_cast<int64_t>(s.tag[1]);
  return f;
}

std::string describe_shm(const shm::Fingerprint& s) {
  const uint32_t phase = s.kind >> 24;
  return from_shm(s).describe() + ", piece " + std::to_string(s.piece) +
         (phase == kScatterPhase  ? " (two-shot, reduce phase)"
          : phase == kGatherPhase ? " (two-shot, gather phase)"
                                  : "");
}

// Rank d's part of a two-shot step of `count` elements of `elem` bytes: elements
// [part_begin(d), part_begin(d + 1)). Boundaries on 64-byte multiples, so every rank's sum
// runs on whole cache lines of the slots; rank-invariant.
int64_t part_begin(int64_t count, int64_t elem, int64_t tp, int64_t d) {
  const int64_t unit = std::max<int64_t>(1, 64 / elem);
  const int64_t per_rank = (count + tp * unit - 1) / (tp * unit) * unit;
  return std::min(count, per_rank * d);
}

// A thread that sums the reductions of fused steps while the caller's thread runs the GEMM
// of the next step. It only reads slots and writes the ops' outputs; the channel stays
// driven by the caller's thread alone (channel.h). Ordering: a task is submitted after the
// caller's wait_all() (acquire loads of the peers' `published`), and the queue's mutex
// carries that to the helper, so it reads complete slots; the caller learns of completion
// under the same mutex before its finish() (release store of `finished`), so a peer reuses
// its slot only after the helper is done reading it.
//
// Never destroyed in a forked child (ShmTransport leaks it there): the child has no such
// thread to join, and its copy of the condition variables still counts the parent's waiter,
// so destroying them would block forever.
class ReduceHelper {
 public:
  ReduceHelper() : thread_([this] { run(); }) {}
  ~ReduceHelper() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  ReduceHelper(const ReduceHelper&) = delete;
  ReduceHelper& operator=(const ReduceHelper&) = delete;

  // Queues `task`; returns its ticket (tasks run in submission order).
  uint64_t submit(std::function<void()> task) {
    uint64_t ticket;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ticket = ++submitted_;
      queue_.emplace_back(ticket, std::move(task));
    }
    cv_.notify_all();
    return ticket;
  }

  // Blocks until task `ticket` ran; rethrows what it threw.
  void wait(uint64_t ticket) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return completed_ >= ticket; });
    if (failed_ticket_ == ticket) {
      std::exception_ptr e = std::exchange(failure_, nullptr);
      failed_ticket_ = 0;
      std::rethrow_exception(e);
    }
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      auto [ticket, task] = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      std::exception_ptr error;
      try {
        task();
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (error && !failure_) {
        failure_ = error;
        failed_ticket_ = ticket;
      }
      completed_ = ticket;
      done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<std::pair<uint64_t, std::function<void()>>> queue_;
  uint64_t submitted_ = 0, completed_ = 0, failed_ticket_ = 0;
  std::exception_ptr failure_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members it uses exist
};

// This process's CPUs (sched_getaffinity) as kAffinityWords 64-bit words.
constexpr int kAffinityWords = CPU_SETSIZE / 64;
std::vector<int64_t> affinity_words() {
  std::vector<int64_t> words(kAffinityWords, 0);
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return words;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) {
      words[cpu / 64] |= static_cast<int64_t>(uint64_t{1} << (cpu % 64));
    }
  }
  return words;
}

// A tensor over `bytes` of shared memory (no ownership: valid while its step is).
at::Tensor view(uint8_t* base, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::from_blob(base, sizes, options.device(at::kCPU));
}

class ShmTransport final : public Transport {
 public:
  // `shared_cpus`: the CPUs of this rank and of every rank whose CPUs overlap its own;
  // `sharing_ranks`: how many ranks those are (this one included).
  ShmTransport(std::unique_ptr<shm::Channel> channel, std::string group_name,
               std::unique_ptr<Transport> fallback, int64_t two_shot_bytes, ShmOverlap overlap,
               DebugThrow debug_throw, int64_t shared_cpus, int64_t sharing_ranks)
      : channel_(std::move(channel)),
        name_(std::move(group_name)),
        fallback_(std::move(fallback)),
        two_shot_bytes_(two_shot_bytes),
        overlap_(overlap),
        debug_throw_(debug_throw),
        shared_cpus_(shared_cpus),
        sharing_ranks_(sharing_ranks) {}

  // In a forked child (e.g. one that ends with sys.exit()), the helper is left alone (see
  // ReduceHelper) and the channel only unmaps.
  ~ShmTransport() override {
    if (channel_->foreign()) (void)helper_.release();
  }

  void abort(const std::string& why) noexcept override { channel_->abort(why); }
  // A step of `call` destroyed before this rank finished it (an exception on the way).
  void abandoned(const CallInfo& call, const shm::Channel::Step& step) noexcept {
    try {
      abort(std::string(call.op) + " failed on rank " + std::to_string(rank()) +
            " and left step " + std::to_string(step.seq) + " unfinished");
    } catch (...) {
      abort("a step was left unfinished");  // no memory for the message
    }
  }

  const char* name() const override { return "shm"; }
  int max_in_flight() const override { return 2; }
  int64_t step_capacity() const override { return static_cast<int64_t>(channel_->slot_bytes()); }

  int64_t size() const { return channel_->size(); }
  DebugThrow debug_throw() const { return debug_throw_; }
  int64_t rank() const { return channel_->rank(); }
  shm::Channel& channel() { return *channel_; }
  uint64_t next_call() { return ++calls_; }

  // Runs `fn`; any failure aborts the channel (abort_on_error), and a protocol failure becomes
  // an error naming the op and the group.
  template <typename Fn>
  auto guard(const CallInfo& call, Fn&& fn) -> decltype(fn()) {
    try {
      return abort_on_error(*this, call.op, rank(), fn);
    } catch (const shm::ShmError& e) {
      fail_collective(call.op, name_, size(), rank(), " on the shared-memory transport", e);
    }
  }

  shm::Channel::Step begin(const Fingerprint& fp, int piece, const CallInfo& call,
                           Phase phase = kOneShot) {
    return guard(call, [&] { return channel_->begin(to_shm(fp, piece, phase)); });
  }

  // Whether an all-reduce step of `bytes` per rank runs two-shot (rank-invariant).
  bool two_shot(int64_t bytes) const { return bytes >= two_shot_bytes_; }

  // Whether the reductions of fused steps go to the helper thread, overlapped with the
  // next step's GEMM: forced on or off, or (auto) when the CPUs this rank shares with its
  // peers outnumber the GEMM threads all of them run, so the helper has a core to itself.
  // A local choice: every rank runs the same steps with the same fingerprints either way,
  // only which of its threads sums them differs, so ranks need not agree on it.
  bool overlap_now() const {
    if (overlap_ != ShmOverlap::kAuto) return overlap_ == ShmOverlap::kOn;
    return shared_cpus_ > static_cast<int64_t>(at::get_num_threads()) * sharing_ranks_;
  }
  ReduceHelper& helper() {
    if (!helper_) helper_ = std::make_unique<ReduceHelper>();
    return *helper_;
  }

  // The rest of a two-shot all-reduce step once this rank has written its `count`
  // elements into its slot of `a` (begun with kScatterPhase): publish a; every rank sums
  // its part of every rank's slot of a straight into its own slot of step b; then every
  // rank copies every rank's part of b into `dst` (which may be where the slot's data
  // came from). Results are bitwise equal on every rank (each part is summed once) and
  // to the one-shot sum (the same kernel sums each element in the same rank order).
  void finish_two_shot(const shm::Channel::Step& a, const Fingerprint& fp, int piece,
                       int64_t count, c10::ScalarType dtype, uint8_t* dst, const CallInfo& call) {
    const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
    const int64_t mine = part_begin(count, elem, size(), rank());
    const int64_t mine_end = part_begin(count, elem, size(), rank() + 1);
    guard(call, [&] {
      channel_->publish(a);
      channel_->wait_all(a);
      // b may begin now: a is published, and b - 2 (the previous step) is finished.
      const auto b = channel_->begin(to_shm(fp, piece, kGatherPhase));
      if (mine_end > mine) {
        reduce_slots(a, mine * elem, mine_end - mine, dtype, slot(rank(), b) + mine * elem);
      }
      channel_->finish(a);
      channel_->publish(b);
      channel_->wait_all(b);
      for (int64_t d = 0; d < size(); ++d) {
        const int64_t lo = part_begin(count, elem, size(), d);
        const int64_t hi = part_begin(count, elem, size(), d + 1);
        if (hi > lo) std::memcpy(dst + lo * elem, slot(d, b) + lo * elem, (hi - lo) * elem);
      }
      channel_->finish(b);
    });
  }

  uint8_t* slot(int64_t r, const shm::Channel::Step& step) const {
    return channel_->slot(static_cast<int>(r), step);
  }

  // Sum of `count` elements at byte offset `offset` of every rank's slot into
  // `dst`, in rank order on every rank (so replicated results are bitwise equal).
  void reduce_slots(const shm::Channel::Step& step, int64_t offset, int64_t count,
                    c10::ScalarType dtype, void* dst) {
    debug_throw_if(debug_throw_, DebugThrow::kSum);
    std::vector<const void*> srcs(size());
    for (int64_t d = 0; d < size(); ++d) srcs[d] = slot(d, step) + offset;
    if (kernels::sum_supports(dtype)) {
      kernels::sum_kernel.get()(dst, srcs.data(), static_cast<int>(size()), count, dtype,
                                /*parallel=*/true);
      return;
    }
    const auto options = at::TensorOptions().dtype(dtype);
    at::Tensor out = view(static_cast<uint8_t*>(dst), {count}, options);
    out.copy_(view(const_cast<uint8_t*>(static_cast<const uint8_t*>(srcs[0])), {count}, options));
    for (int64_t d = 1; d < size(); ++d) {
      out.add_(view(const_cast<uint8_t*>(static_cast<const uint8_t*>(srcs[d])), {count},
                    options));
    }
  }

  void all_reduce(at::Tensor& t, const CallInfo& call) override;
  void reduce_scatter(at::Tensor& out, const at::Tensor& in, const CallInfo& call) override;
  void all_gather(at::Tensor& out, const at::Tensor& in, const CallInfo& call) override;
  std::unique_ptr<ReduceStep> reduce_scatter_step(at::Tensor out, const CallInfo& call,
                                                  int piece) override;
  std::unique_ptr<ReduceStep> all_reduce_step(at::Tensor out, const CallInfo& call,
                                              int piece) override;
  std::unique_ptr<GatherStep> all_gather_step(int64_t block_rows, int64_t cols,
                                              const at::TensorOptions& options,
                                              const CallInfo& call, int piece) override;

 private:
  using Step = shm::Channel::Step;
  template <typename Write, typename Read>
  void stream(const Fingerprint& fp, int64_t total, int64_t per_piece, const CallInfo& call,
              Write write, Read read);

  // Elements of one piece of a streamed collective moving `lanes` equal lanes
  // (per rank) of `elem` bytes each through one slot.
  int64_t piece_elems(int64_t lanes, int64_t elem) const {
    return std::max<int64_t>(1, step_capacity() / (lanes * elem));
  }

  std::unique_ptr<shm::Channel> channel_;
  std::string name_;
  std::unique_ptr<Transport> fallback_;  // tensors that are not on the CPU
  int64_t two_shot_bytes_;               // two_shot_threshold(): agreed, rank-invariant
  ShmOverlap overlap_;
  DebugThrow debug_throw_;
  int64_t shared_cpus_, sharing_ranks_;  // see the constructor
  uint64_t calls_ = 0;                   // collectives issued (fingerprints)
  std::unique_ptr<ReduceHelper> helper_;  // started at the first overlapped step
};

// --- fused steps ---------------------------------------------------------------------------

// One reduce-scatter or all-reduce chunk. The partial is written straight into
// this rank's slot (send_buffer); start() publishes it, waits for every peer and
// sums this rank's rows of every slot into `out`.
class ShmReduceStep final : public ReduceStep {
 public:
  // `fp`: the fingerprint of the collective this step is `piece` of; by default a collective
  // of its own (a fused step).
  ShmReduceStep(ShmTransport& t, at::Tensor out, const CallInfo& call, int piece, bool scatter,
                const Fingerprint* fp = nullptr)
      : t_(t), out_(std::move(out)), call_(call), scatter_(scatter) {
    TORCH_INTERNAL_ASSERT(out_.is_contiguous() && out_.dim() == 2);
    const int64_t lanes = scatter_ ? t_.size() : 1;
    const int64_t bytes = lanes * out_.numel() * out_.element_size();
    TORCH_CHECK(bytes <= t_.step_capacity(), call.op, ": a step of ", bytes,
                " bytes exceeds the shared-memory slot of ", t_.step_capacity(), " bytes");
    const Collective kind = scatter_ ? Collective::kReduceScatter : Collective::kAllReduce;
    two_shot_ = !scatter_ && t_.two_shot(bytes);
    fp_ = fp != nullptr ? *fp
                        : make_fingerprint(kind, out_.scalar_type(), bytes, call, t_.next_call());
    piece_ = piece;
    step_ = t_.begin(fp_, piece, call_, two_shot_ ? kScatterPhase : kOneShot);
  }

  at::Tensor send_buffer() override {
    const int64_t rows = out_.size(0) * (scatter_ ? t_.size() : 1);
    return view(t_.slot(t_.rank(), step_), {rows, out_.size(1)}, out_.options());
  }

  ~ShmReduceStep() override {
    // Abandoned with its sum still running (the caller failed): the helper must be done
    // with `out_` and the slots before they go.
    if (ticket_ != 0) {
      try {
        t_.helper().wait(ticket_);
      } catch (...) {
      }
    }
    // Abandoned unfinished: the peers wait for this rank's step, so the channel is aborted (a
    // caller that saw the cause has aborted it with the cause already; the first reason stays).
    if (!done_) t_.abandoned(call_, step_);
  }

  void start() override {
    auto& stats = core::Stats::instance();
    if (two_shot_) {
      t_.finish_two_shot(step_, fp_, piece_, out_.numel(), out_.scalar_type(),
                         static_cast<uint8_t*>(out_.data_ptr()), call_);
      done_ = true;
      stats.record(core::TransportPath::kAllReduceTwoShot);
      return;
    }
    if (!scatter_) stats.record(core::TransportPath::kAllReduceOneShot);
    t_.guard(call_, [&] {
      t_.channel().publish(step_);
      t_.channel().wait_all(step_);
      // Reduce-scatter: this rank's block r sits at the same offset in every slot.
      const int64_t offset = scatter_ ? t_.rank() * out_.numel() * out_.element_size() : 0;
      // Only reduce-scatter steps overlap. An all-reduce step may run two-shot, which
      // begins a second step, and that needs every earlier step finished.
      if (scatter_ && kernels::sum_supports(out_.scalar_type()) && t_.overlap_now()) {
        // Summed by the helper while this thread computes the next step; wait() finishes.
        std::vector<const void*> srcs(t_.size());
        for (int64_t d = 0; d < t_.size(); ++d) srcs[d] = t_.slot(d, step_) + offset;
        ticket_ = t_.helper().submit([srcs = std::move(srcs), out = out_.data_ptr(),
                                      count = out_.numel(), dtype = out_.scalar_type(),
                                      inject = t_.debug_throw()] {
          debug_throw_if(inject, DebugThrow::kSum);
          kernels::sum_kernel.get()(out, srcs.data(), static_cast<int>(srcs.size()), count,
                                    dtype, /*parallel=*/false);
        });
        stats.record(core::TransportPath::kReduceOverlapped);
        return;
      }
      t_.reduce_slots(step_, offset, out_.numel(), out_.scalar_type(), out_.data_ptr());
      t_.channel().finish(step_);
      done_ = true;
      if (scatter_) stats.record(core::TransportPath::kReduceInline);
    });
  }

  void wait() override {
    if (ticket_ == 0) return;
    const uint64_t ticket = std::exchange(ticket_, 0);
    // A failed sum aborts the channel here: the peers wait for this rank's finish().
    t_.guard(call_, [&] {
      t_.helper().wait(ticket);
      t_.channel().finish(step_);
      done_ = true;
    });
  }

 private:
  ShmTransport& t_;
  at::Tensor out_;
  CallInfo call_;
  bool scatter_;
  bool two_shot_ = false;
  Fingerprint fp_;
  int piece_ = 0;
  shm::Channel::Step step_;
  uint64_t ticket_ = 0;  // the helper's task summing this step, 0 when none is pending
  bool done_ = false;    // this rank finished the step
};

// One all-gather chunk: each rank's rows in its own slot; the consumer reads the
// peers' rows where they are (block(d) is a read-only view of d's slot).
class ShmGatherStep final : public GatherStep {
 public:
  ShmGatherStep(ShmTransport& t, int64_t rows, int64_t cols, const at::TensorOptions& options,
                const CallInfo& call, int piece)
      : t_(t), rows_(rows), cols_(cols), options_(options), call_(call) {
    const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(
                                            c10::typeMetaToScalarType(options.dtype())));
    TORCH_CHECK(bytes <= t_.step_capacity(), call.op, ": a step of ", bytes,
                " bytes exceeds the shared-memory slot of ", t_.step_capacity(), " bytes");
    step_ = t_.begin(make_fingerprint(Collective::kAllGather,
                                      c10::typeMetaToScalarType(options.dtype()), bytes, call,
                                      t_.next_call()),
                     piece, call_);
    ready_.assign(t_.size(), false);
  }

  at::Tensor send_buffer() override {
    return view(t_.slot(t_.rank(), step_), {rows_, cols_}, options_);
  }

  void start(const at::Tensor* rows) override {
    t_.guard(call_, [&] {
      if (rows != nullptr) send_buffer().copy_(*rows);
      t_.channel().publish(step_);
    });
  }

  at::Tensor block(int64_t d) override {
    if (!ready_[d]) {
      t_.guard(call_, [&] { t_.channel().wait_peer(step_, static_cast<int>(d)); });
      ready_[d] = true;
    }
    return view(t_.slot(d, step_), {rows_, cols_}, options_);
  }

  void finish() override {
    t_.guard(call_, [&] {
      t_.channel().wait_all(step_);  // a rank that read no block still pairs the step
      t_.channel().finish(step_);
    });
    done_ = true;
  }

  ~ShmGatherStep() override {
    if (!done_) t_.abandoned(call_, step_);  // as ~ShmReduceStep
  }

 private:
  ShmTransport& t_;
  int64_t rows_, cols_;
  at::TensorOptions options_;
  CallInfo call_;
  shm::Channel::Step step_;
  std::vector<bool> ready_;
  bool done_ = false;  // this rank finished the step
};

std::unique_ptr<ReduceStep> ShmTransport::reduce_scatter_step(at::Tensor out,
                                                              const CallInfo& call, int piece) {
  return std::make_unique<ShmReduceStep>(*this, std::move(out), call, piece, /*scatter=*/true);
}

std::unique_ptr<ReduceStep> ShmTransport::all_reduce_step(at::Tensor out, const CallInfo& call,
                                                          int piece) {
  return std::make_unique<ShmReduceStep>(*this, std::move(out), call, piece, /*scatter=*/false);
}

std::unique_ptr<GatherStep> ShmTransport::all_gather_step(int64_t block_rows, int64_t cols,
                                                          const at::TensorOptions& options,
                                                          const CallInfo& call, int piece) {
  return std::make_unique<ShmGatherStep>(*this, block_rows, cols, options, call, piece);
}

// --- plain collectives, streamed through the slots -------------------------------------------

// A plain collective, streamed: `total` elements of each lane in pieces of at most
// `per_piece`, one step each: write(step, offset, count) fills this rank's slot, then
// every rank publishes, waits for every peer, read(step, offset, count) takes what it
// needs from the slots, and finishes the step.
template <typename Write, typename Read>
void ShmTransport::stream(const Fingerprint& fp, int64_t total, int64_t per_piece,
                          const CallInfo& call, Write write, Read read) {
  int piece = 0;
  for (int64_t off = 0; off < total; off += per_piece, ++piece) {
    const int64_t count = std::min(per_piece, total - off);
    const auto step = begin(fp, piece, call);
    guard(call, [&] {
      write(step, off, count);
      channel_->publish(step);
      channel_->wait_all(step);
      read(step, off, count);
      channel_->finish(step);
    });
  }
}

void ShmTransport::all_reduce(at::Tensor& t, const CallInfo& call) {
  if (!t.device().is_cpu()) return fallback_->all_reduce(t, call);
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  // The fused steps' protocol (one-shot or two-shot by size) on pieces that fit a slot,
  // each copied into this rank's slot and summed back into t. Every piece carries the
  // fingerprint of the whole collective (total bytes, one call number), so ranks with
  // different sizes differ at the first piece, not only once one runs out of pieces.
  at::Tensor flat = t.view({-1});
  const Fingerprint fp = make_fingerprint(Collective::kAllReduce, t, call, next_call());
  const int64_t per_piece = piece_elems(1, t.element_size());
  int piece = 0;
  for (int64_t off = 0; off < flat.numel(); off += per_piece) {
    const int64_t count = std::min(per_piece, flat.numel() - off);
    at::Tensor rows = flat.narrow(0, off, count).view({1, count});
    ShmReduceStep step(*this, rows, call, piece++, /*scatter=*/false, &fp);
    guard(call, [&] { step.send_buffer().copy_(rows); });
    step.start();
    step.wait();
  }
}

void ShmTransport::reduce_scatter(at::Tensor& out, const at::Tensor& in, const CallInfo& call) {
  if (!in.device().is_cpu()) return fallback_->reduce_scatter(out, in, call);
  TORCH_INTERNAL_ASSERT(in.is_contiguous() && out.is_contiguous());
  const int64_t elem = in.element_size(), block = out.numel();
  const uint8_t* src = static_cast<const uint8_t*>(in.data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(out.data_ptr());
  stream(
      make_fingerprint(Collective::kReduceScatter, in, call, next_call()), block,
      piece_elems(size(), elem), call,
      // Slot layout of a piece: lane d = elements [off, off + count) of block d.
      [&](const Step& step, int64_t off, int64_t count) {
        for (int64_t d = 0; d < size(); ++d) {
          std::memcpy(slot(rank(), step) + d * count * elem, src + (d * block + off) * elem,
                      count * elem);
        }
      },
      [&](const Step& step, int64_t off, int64_t count) {
        reduce_slots(step, rank() * count * elem, count, in.scalar_type(), dst + off * elem);
      });
}

void ShmTransport::all_gather(at::Tensor& out, const at::Tensor& in, const CallInfo& call) {
  if (!in.device().is_cpu()) return fallback_->all_gather(out, in, call);
  TORCH_INTERNAL_ASSERT(in.is_contiguous() && out.is_contiguous());
  const int64_t elem = in.element_size(), block = in.numel();
  const uint8_t* src = static_cast<const uint8_t*>(in.data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(out.data_ptr());
  stream(
      make_fingerprint(Collective::kAllGather, in, call, next_call()), block,
      piece_elems(1, elem), call,
      [&](const Step& step, int64_t off, int64_t count) {
        std::memcpy(slot(rank(), step), src + off * elem, count * elem);
      },
      [&](const Step& step, int64_t off, int64_t count) {
        for (int64_t d = 0; d < size(); ++d) {
          std::memcpy(dst + (d * block + off) * elem, slot(d, step), count * elem);
        }
      });
}

// --- set-up ---------------------------------------------------------------------------------

// Identifies the kernel this process runs on (ranks on one host share it, also
// across containers), falling back to the host name.
int64_t host_identity() {
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (boot && std::getline(boot, id) && !id.empty()) return core::stable_hash("boot:" + id);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return core::stable_hash(std::string("host:") + host);
}

// Every segment of this transport is named "<kSegmentPrefix>...".
constexpr const char* kSegmentPrefix = "fc-";

// The same on every rank; each rank's segment name adds its rank and a random suffix.
std::string channel_name(const std::string& group_name) {
  std::ostringstream s;
  s << kSegmentPrefix << "g";
  for (char c : group_name.substr(0, 64)) {
    s << ((std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-') ? c
                                                                                             : '_');
  }
  return s.str();
}

std::chrono::milliseconds group_timeout(const Group& g) {
  try {
    return g.process_group().getBackend(c10::DeviceType::CPU)->getBackendOptions()->timeout;
  } catch (const std::exception&) {
    return std::chrono::milliseconds(300000);
  }
}

// Every rank's flag, exchanged; the first failing rank's index or -1.
int64_t first_failure(const Group& g, bool ok, const char* op) {
  const std::vector<int64_t> all =
      exchange_over_process_group(g, at::tensor({static_cast<int64_t>(ok)}), op);
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r] == 0) return static_cast<int64_t>(r);
  }
  return -1;
}

}  // namespace

std::unique_ptr<Transport> try_make_shm_transport(const Group& g, const at::Device& device,
                                                  bool required, const ShmSettings& settings) {
  constexpr const char* kOp = "flashcomm transport set-up";
  auto refuse = [&](const std::string& why) -> std::unique_ptr<Transport> {
    TORCH_CHECK(!required, "flashcomm: the shared-memory transport was requested for group '",
                g.name(), "' (FLASHCOMM_TRANSPORT=shm or flashcomm.init(transport='shm')) but ",
                why, "; use FLASHCOMM_TRANSPORT=auto or c10d");
    if (g.rank() == 0) {
      LOG(WARNING) << "flashcomm: group '" << g.name() << "' uses the c10d transport: " << why;
    }
    return nullptr;
  };
  // Rank-invariant preconditions first (no collective spent on them).
  if (!device.is_cpu()) return refuse("its tensors live on " + device.str() + ", not the CPU");
  if (g.size() > shm::kMaxRanks) {
    return refuse("it has " + std::to_string(g.size()) + " ranks (at most " +
                  std::to_string(shm::kMaxRanks) + ")");
  }
  // Same host?
  const std::vector<int64_t> ids =
      exchange_over_process_group(g, at::tensor({host_identity()}), kOp);
  for (int64_t r = 1; r < g.size(); ++r) {
    if (ids[r] != ids[0]) {
      return refuse("its ranks run on different hosts (rank " + std::to_string(r) +
                    " is not on rank 0's host)");
    }
  }
  // Segments of ranks killed during an earlier set-up (between create and unlink) would stay
  // until reboot: remove those whose creator is provably dead.
  if (g.rank() == 0) {
    const std::vector<std::string> removed = shm::reclaim_dead_segments(kSegmentPrefix);
    if (!removed.empty()) {
      std::string names;
      for (const std::string& name : removed) names += (names.empty() ? "" : ", ") + name;
      LOG(WARNING) << "flashcomm: removed " << removed.size()
                   << " shared-memory segment(s) left by dead processes: " << names;
    }
  }
  shm::ChannelOptions options;
  options.name = channel_name(g.name());
  options.rank = static_cast<int>(g.rank());
  options.size = static_cast<int>(g.size());
  options.slot_bytes = static_cast<size_t>(settings.bytes / 2);
  options.timeout = group_timeout(g);
  options.label = "group '" + g.name() + "'";
  options.describe = describe_shm;
  // A waiting rank spins briefly, then yields, then sleeps. Yielding returns at once
  // when nothing else wants the core, so on ranks with a core each (as serving engines
  // bind them) it reacts like a spin; sleeping adds a timer's latency to the step.
  options.wait.yield = std::chrono::microseconds(settings.yield_us);
  options.wait.spin = std::min(options.wait.spin, options.wait.yield);

  std::unique_ptr<shm::Channel> channel;
  std::string why;
  // create -> (exchange) -> map peers + probe -> (exchange) -> unlink: once every rank
  // has mapped every segment, no name is left in /dev/shm whatever happens later.
  try {
    channel = shm::Channel::create(options);
  } catch (const shm::ShmError& e) {
    why = e.what();
  }
  // Test-only hook: this rank dies (SIGKILL) holding a segment that is not unlinked yet.
  if (channel != nullptr && settings.debug_die_after_create) {
    ::raise(SIGKILL);
  }
  const std::vector<int64_t> tokens = exchange_over_process_group(
      g, at::tensor({static_cast<int64_t>(channel != nullptr),
                     channel ? static_cast<int64_t>(channel->instance_token()) : int64_t{0}}),
      kOp);
  for (int64_t r = 0; r < g.size(); ++r) {
    if (tokens[2 * r] == 0) {
      return refuse(r == g.rank() ? why
                                  : "rank " + std::to_string(r) +
                                        " could not create its shared-memory segment of " +
                                        std::to_string(2 * options.slot_bytes) +
                                        " bytes (FLASHCOMM_SHM_BYTES; see that rank's log)");
    }
  }
  bool ok = true;
  try {
    // Debug hook (tests of the fallback): this rank behaves as if it could not map
    // its peers' segments, e.g. ranks in containers that do not share /dev/shm.
    if (settings.debug_unmappable) {
      throw shm::ShmError(shm::ShmError::Kind::kSetup, -1,
                          "cannot map the peers' segments (simulated by "
                          "FLASHCOMM_DEBUG_SHM_UNMAPPABLE=1)");
    }
    std::vector<uint64_t> instance(g.size());
    for (int64_t r = 0; r < g.size(); ++r) instance[r] = static_cast<uint64_t>(tokens[2 * r + 1]);
    channel->map_peers(instance);
    ok = channel->probe(instance);
    if (!ok) why = "a peer's segment did not hold the token that peer wrote";
  } catch (const shm::ShmError& e) {
    ok = false;
    why = e.what();
  }
  const int64_t failed = first_failure(g, ok, kOp);
  channel->unlink_own();
  if (failed >= 0) {
    return refuse(failed == g.rank()
                      ? why
                      : "rank " + std::to_string(failed) + " could not map its peers' segments");
  }
  auto fallback = make_c10d_transport(g.process_group_ptr(), g.name(), C10dOptions());
  // Which ranks share CPUs with this one (ranks bound to disjoint cores share none).
  const std::vector<int64_t> masks = exchange_over_process_group(
      g, at::tensor(affinity_words(), at::TensorOptions().dtype(at::kLong)), kOp);
  const int64_t* own = masks.data() + g.rank() * kAffinityWords;
  std::vector<uint64_t> shared(own, own + kAffinityWords);
  int64_t sharing_ranks = 0;
  for (int64_t r = 0; r < g.size(); ++r) {
    const int64_t* theirs = masks.data() + r * kAffinityWords;
    bool overlaps = false;
    for (int w = 0; w < kAffinityWords; ++w) overlaps |= (own[w] & theirs[w]) != 0;
    if (!overlaps && r != g.rank()) continue;
    ++sharing_ranks;
    for (int w = 0; w < kAffinityWords; ++w) shared[w] |= static_cast<uint64_t>(theirs[w]);
  }
  int64_t shared_cpus = 0;
  for (uint64_t w : shared) shared_cpus += __builtin_popcountll(w);
  return std::make_unique<ShmTransport>(
      std::move(channel), g.name(), std::move(fallback),
      two_shot_threshold(settings.two_shot_bytes, g.size()), settings.overlap,
      settings.debug_throw, shared_cpus, sharing_ranks);
}

}  // namespace flashcomm::comm
