#include "comm/shm_transport.h"

#include <c10/util/Logging.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
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
#include "core/shm/channel.h"
#include "kernels/cpu/reduce.h"

namespace flashcomm::comm {

namespace shm = core::shm;

int64_t shm_bytes_from_env() {
  const char* v = std::getenv("FLASHCOMM_SHM_BYTES");
  if (v == nullptr || v[0] == '\0') return kDefaultShmBytes;
  char* end = nullptr;
  const long long bytes = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && bytes >= (int64_t{64} << 10),
              "FLASHCOMM_SHM_BYTES must be an integer number of bytes >= 65536, got '", v, "'");
  return bytes;
}

namespace {

// Our fingerprint (fingerprint.h) in the protocol's fixed record: the collective,
// the caller's mode and strategy in `kind`; the op and its token count as tags.
shm::Fingerprint to_shm(const Fingerprint& f, int piece) {
  shm::Fingerprint s;
  s.kind = static_cast<uint32_t>(f.kind) | static_cast<uint32_t>(f.mode + 1) << 8 |
           static_cast<uint32_t>(f.strategy + 1) << 16;
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
  return from_shm(s).describe() + ", piece " + std::to_string(s.piece);
}

// A tensor over `bytes` of shared memory (no ownership: valid while its step is).
at::Tensor view(uint8_t* base, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::from_blob(base, sizes, options.device(at::kCPU));
}

class ShmTransport final : public Transport {
 public:
  ShmTransport(std::unique_ptr<shm::Channel> channel, std::string group_name,
               std::unique_ptr<Transport> fallback)
      : channel_(std::move(channel)),
        name_(std::move(group_name)),
        fallback_(std::move(fallback)) {}

  const char* name() const override { return "shm"; }
  int max_in_flight() const override { return 2; }
  int64_t step_capacity() const override { return static_cast<int64_t>(channel_->slot_bytes()); }

  int64_t size() const { return channel_->size(); }
  int64_t rank() const { return channel_->rank(); }
  shm::Channel& channel() { return *channel_; }
  uint64_t next_call() { return ++calls_; }

  // Runs `fn`; a protocol failure becomes an error naming the op and the group.
  template <typename Fn>
  auto guard(const CallInfo& call, Fn&& fn) -> decltype(fn()) {
    try {
      return fn();
    } catch (const shm::ShmError& e) {
      fail_collective(call.op, name_, size(), rank(), " on the shared-memory transport", e);
    }
  }

  shm::Channel::Step begin(const Fingerprint& fp, int piece, const CallInfo& call) {
    return guard(call, [&] { return channel_->begin(to_shm(fp, piece)); });
  }

  uint8_t* slot(int64_t r, const shm::Channel::Step& step) const {
    return channel_->slot(static_cast<int>(r), step);
  }

  // Sum of `count` elements at byte offset `offset` of every rank's slot into
  // `dst`, in rank order on every rank (so replicated results are bitwise equal).
  void reduce_slots(const shm::Channel::Step& step, int64_t offset, int64_t count,
                    c10::ScalarType dtype, void* dst) {
    std::vector<const void*> srcs(size());
    for (int64_t d = 0; d < size(); ++d) srcs[d] = slot(d, step) + offset;
    if (kernels::sum_supports(dtype)) {
      kernels::sum_kernel.get()(dst, srcs.data(), static_cast<int>(size()), count, dtype);
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
  uint64_t calls_ = 0;                   // collectives issued (fingerprints)
};

// --- fused steps ---------------------------------------------------------------------------

// One reduce-scatter or all-reduce chunk. The partial is written straight into
// this rank's slot (send_buffer); start() publishes it, waits for every peer and
// sums this rank's rows of every slot into `out`.
class ShmReduceStep final : public ReduceStep {
 public:
  ShmReduceStep(ShmTransport& t, at::Tensor out, const CallInfo& call, int piece, bool scatter)
      : t_(t), out_(std::move(out)), call_(call), scatter_(scatter) {
    TORCH_INTERNAL_ASSERT(out_.is_contiguous() && out_.dim() == 2);
    const int64_t lanes = scatter_ ? t_.size() : 1;
    const int64_t bytes = lanes * out_.numel() * out_.element_size();
    TORCH_CHECK(bytes <= t_.step_capacity(), call.op, ": a step of ", bytes,
                " bytes exceeds the shared-memory slot of ", t_.step_capacity(), " bytes");
    const Collective kind = scatter_ ? Collective::kReduceScatter : Collective::kAllReduce;
    step_ = t_.begin(make_fingerprint(kind, out_.scalar_type(), bytes, call, t_.next_call()), piece,
                     call_);
  }

  at::Tensor send_buffer() override {
    const int64_t rows = out_.size(0) * (scatter_ ? t_.size() : 1);
    return view(t_.slot(t_.rank(), step_), {rows, out_.size(1)}, out_.options());
  }

  void start() override {
    t_.guard(call_, [&] {
      t_.channel().publish(step_);
      t_.channel().wait_all(step_);
      // Reduce-scatter: this rank's block r sits at the same offset in every slot.
      const int64_t offset = scatter_ ? t_.rank() * out_.numel() * out_.element_size() : 0;
      t_.reduce_slots(step_, offset, out_.numel(), out_.scalar_type(), out_.data_ptr());
      t_.channel().finish(step_);
    });
  }

  void wait() override {}

 private:
  ShmTransport& t_;
  at::Tensor out_;
  CallInfo call_;
  bool scatter_;
  shm::Channel::Step step_;
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
    if (rows != nullptr) send_buffer().copy_(*rows);
    t_.guard(call_, [&] { t_.channel().publish(step_); });
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
  }

 private:
  ShmTransport& t_;
  int64_t rows_, cols_;
  at::TensorOptions options_;
  CallInfo call_;
  shm::Channel::Step step_;
  std::vector<bool> ready_;
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
  const int64_t elem = t.element_size();
  uint8_t* data = static_cast<uint8_t*>(t.data_ptr());
  stream(
      make_fingerprint(Collective::kAllReduce, t, call, next_call()), t.numel(),
      piece_elems(1, elem), call,
      [&](const Step& step, int64_t off, int64_t count) {
        std::memcpy(slot(rank(), step), data + off * elem, count * elem);
      },
      // Every rank sums the same slots in the same order: bitwise-equal results.
      [&](const Step& step, int64_t off, int64_t count) {
        reduce_slots(step, 0, count, t.scalar_type(), data + off * elem);
      });
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

int64_t env_microseconds(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return fallback;
  char* end = nullptr;
  const long long us = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && us >= 0, name,
              " must be a non-negative integer number of microseconds, got '", v, "'");
  return us;
}

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

std::string channel_name(uint64_t nonce, const std::string& group_name) {
  std::ostringstream s;
  s << "fc-" << std::hex << nonce << "-g";
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
                                                  bool required, int64_t shm_bytes) {
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
  // Same host? And a nonce from rank 0 for the segment names.
  std::random_device rd;
  const uint64_t nonce = (static_cast<uint64_t>(rd()) << 32 ^ rd() ^ getpid()) & 0x7fffffffffffffff;
  const std::vector<int64_t> ids = exchange_over_process_group(
      g, at::tensor({host_identity(), static_cast<int64_t>(nonce)}), kOp);
  for (int64_t r = 1; r < g.size(); ++r) {
    if (ids[2 * r] != ids[0]) {
      return refuse("its ranks run on different hosts (rank " + std::to_string(r) +
                    " is not on rank 0's host)");
    }
  }
  shm::ChannelOptions options;
  options.name = channel_name(static_cast<uint64_t>(ids[1]), g.name());
  options.rank = static_cast<int>(g.rank());
  options.size = static_cast<int>(g.size());
  options.slot_bytes = static_cast<size_t>(shm_bytes / 2);
  options.timeout = group_timeout(g);
  options.label = "group '" + g.name() + "'";
  options.describe = describe_shm;
  // A waiting rank spins briefly, then yields, then sleeps. Yielding returns at once
  // when nothing else wants the core, so on ranks with a core each (as serving engines
  // bind them) it reacts like a spin; sleeping adds a timer's latency to the step.
  // Decode steps see peers a few hundred µs late, hence a long yield phase
  // (FLASHCOMM_SHM_YIELD_US, default 5000) before any sleep.
  options.wait.yield = std::chrono::microseconds(env_microseconds("FLASHCOMM_SHM_YIELD_US", 5000));

  std::unique_ptr<shm::Channel> channel;
  std::string why;
  // create -> (exchange) -> map peers + probe -> (exchange) -> unlink: once every rank
  // has mapped every segment, no name is left in /dev/shm whatever happens later.
  try {
    channel = shm::Channel::create(options);
  } catch (const shm::ShmError& e) {
    why = e.what();
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
    const char* simulate = std::getenv("FLASHCOMM_DEBUG_SHM_UNMAPPABLE");
    if (simulate != nullptr && simulate[0] == '1') {
      throw shm::ShmError(shm::ShmError::Kind::kSetup, -1,
                          "cannot map the peers' segments (simulated by "
                          "FLASHCOMM_DEBUG_SHM_UNMAPPABLE=1)");
    }
    channel->map_peers();
    std::vector<uint64_t> instance(g.size());
    for (int64_t r = 0; r < g.size(); ++r) instance[r] = static_cast<uint64_t>(tokens[2 * r + 1]);
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
  return std::make_unique<ShmTransport>(std::move(channel), g.name(), std::move(fallback));
}

}  // namespace flashcomm::comm
