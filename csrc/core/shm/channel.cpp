#include "core/shm/channel.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <random>
#include <thread>

namespace flashcomm::core::shm {
namespace {

using Kind = ShmError::Kind;
using Clock = std::chrono::steady_clock;
constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelease = std::memory_order_release;
constexpr auto kRelaxed = std::memory_order_relaxed;

[[noreturn]] void setup_error(const std::string& message) {
  throw ShmError(Kind::kSetup, -1, "invalid ChannelOptions: " + message);
}

void check_options(const ChannelOptions& o) {
  bool name_ok = !o.name.empty() && o.name.size() <= kMaxChannelNameLength;
  for (char c : o.name) {
    name_ok = name_ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                          (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-');
  }
  if (!name_ok) {
    setup_error("name must be 1 to " + std::to_string(kMaxChannelNameLength) +
                " characters of [A-Za-z0-9._-] (no '/'), got '" + o.name + "' (" +
                std::to_string(o.name.size()) + " characters)");
  }
  if (o.size < 1 || o.size > kMaxRanks) {
    setup_error("size must be in [1, " + std::to_string(kMaxRanks) + "], got " +
                std::to_string(o.size));
  }
  if (o.rank < 0 || o.rank >= o.size) {
    setup_error("rank must be in [0, size=" + std::to_string(o.size) + "), got " +
                std::to_string(o.rank));
  }
  if (o.slot_bytes < 1 || o.slot_bytes > kMaxSlotBytes) {
    setup_error("slot_bytes must be in [1, " + std::to_string(kMaxSlotBytes) + "], got " +
                std::to_string(o.slot_bytes));
  }
  if (o.timeout.count() <= 0) {
    setup_error("timeout must be > 0 ms, got " + std::to_string(o.timeout.count()));
  }
  const WaitPolicy& w = o.wait;
  if (w.spin.count() < 0 || w.yield < w.spin || w.sleep_min.count() <= 0 ||
      w.sleep_max < w.sleep_min || w.liveness_period.count() <= 0) {
    setup_error(
        "wait needs 0 <= spin <= yield, 0 < sleep_min <= sleep_max and "
        "liveness_period > 0");
  }
}

// FNV-1a of the name, then the group shape: equal on every rank of one channel.
uint64_t channel_token(const std::string& name, int size, size_t slot_bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  auto mix = [&h](uint64_t byte) { h = (h ^ byte) * 0x100000001b3ULL; };
  for (unsigned char c : name) mix(c);
  for (uint64_t v : {uint64_t{layout::kVersion}, static_cast<uint64_t>(size),
                     static_cast<uint64_t>(slot_bytes)}) {
    for (int i = 0; i < 8; ++i) mix((v >> (8 * i)) & 0xff);
  }
  return h;
}

// Distinct per create() with overwhelming probability; never 0.
uint64_t random_instance_token() {
  uint64_t value = 0;
  try {
    std::random_device device;
    value = uint64_t{device()} << 32 ^ device();
  } catch (const std::exception&) {
    // No entropy source: the clock and the pid still tell two setups apart.
    value = static_cast<uint64_t>(Clock::now().time_since_epoch().count()) * 0x9E3779B97F4A7C15ULL ^
            static_cast<uint64_t>(::getpid());
  }
  return value == 0 ? 1 : value;
}

Fingerprint read_record(const layout::FingerprintRecord& rec) {
  Fingerprint fp;
  const uint64_t kind_dtype = rec.kind_dtype.load(kRelaxed);
  fp.kind = static_cast<uint32_t>(kind_dtype >> 32);
  fp.dtype = static_cast<uint32_t>(kind_dtype);
  fp.bytes = rec.bytes.load(kRelaxed);
  fp.call = rec.call.load(kRelaxed);
  fp.piece = static_cast<uint32_t>(rec.piece.load(kRelaxed));
  fp.tag[0] = rec.tag[0].load(kRelaxed);
  fp.tag[1] = rec.tag[1].load(kRelaxed);
  return fp;
}

std::string reason_text(const layout::SegmentHeader& h) {
  return std::string(h.reason, strnlen(h.reason, layout::kReasonBytes));
}

size_t slot_stride_of(size_t slot_bytes) {
  return (slot_bytes + layout::kSlotAlign - 1) / layout::kSlotAlign * layout::kSlotAlign;
}

// start + timeout, or the clock's end when that lies beyond it (e.g. a timeout of
// timedelta.max), instead of an overflow into the past.
Clock::time_point deadline_after(Clock::time_point start, std::chrono::milliseconds timeout) {
  const auto room =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::time_point::max() - start);
  if (timeout >= room) return Clock::time_point::max();
  return start + std::chrono::duration_cast<Clock::duration>(timeout);
}

// Whether the mapped header of a segment of `file_bytes` bytes is a complete channel header of
// this layout whose creator is provably gone (see reclaim_dead_segments).
bool abandoned(const layout::SegmentHeader& h, uint64_t file_bytes, const ProcessId& self) {
  const layout::Identity& id = h.identity;
  if (id.magic.load(kAcquire) != layout::kMagic || id.version != layout::kVersion) return false;
  if (id.size < 1 || id.size > static_cast<uint32_t>(kMaxRanks) || id.rank >= id.size) {
    return false;
  }
  if (id.slot_bytes < 1 || id.slot_bytes > kMaxSlotBytes ||
      id.slot_stride != slot_stride_of(id.slot_bytes) ||
      file_bytes != layout::kHeaderBytes + 2 * id.slot_stride) {
    return false;
  }
  // A pid of another namespace (or of an unknown one) says nothing about liveness here.
  if (self.pid_ns == 0 || id.pid_ns != self.pid_ns || id.pid == 0 ||
      id.pid > static_cast<uint64_t>(INT32_MAX)) {
    return false;
  }
  const ProcessId owner{static_cast<int64_t>(id.pid), id.pid_ns, id.start_time};
  return process_liveness(owner) == Liveness::kGone;
}

}  // namespace

std::string default_description(const Fingerprint& fp) {
  return "kind " + std::to_string(fp.kind) + " dtype " + std::to_string(fp.dtype) + " bytes " +
         std::to_string(fp.bytes) + " call " + std::to_string(fp.call) + " piece " +
         std::to_string(fp.piece) + " tag " + std::to_string(fp.tag[0]) + "/" +
         std::to_string(fp.tag[1]);
}

const char* kind_name(ShmError::Kind kind) {
  switch (kind) {
    case Kind::kSetup:
      return "setup";
    case Kind::kTimeout:
      return "timeout";
    case Kind::kPeerDead:
      return "peer-dead";
    case Kind::kMismatch:
      return "mismatch";
    case Kind::kPeerAborted:
      return "peer-aborted";
    case Kind::kBroken:
      return "broken";
    case Kind::kUsage:
      return "usage";
    case Kind::kForked:
      return "forked";
  }
  return "?";
}

Channel::Channel(const ChannelOptions& options)
    : options_(options),
      segment_names_(options.size),
      slot_stride_(slot_stride_of(options.slot_bytes)),
      segment_bytes_(layout::kHeaderBytes + 2 * slot_stride_),
      token_(channel_token(options.name, options.size, options.slot_bytes)),
      self_(current_process()),
      peers_(options.size),
      bases_(options.size, nullptr),
      check_liveness_(options.size, false) {}

std::string Channel::segment_name_of(int rank, uint64_t instance) const {
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(instance));
  return "/" + options_.name + "-r" + std::to_string(rank) + "-" + hex;
}

std::unique_ptr<Channel> Channel::create(const ChannelOptions& options) {
  check_options(options);
  std::unique_ptr<Channel> channel(new Channel(options));
  Channel& ch = *channel;
  // From here on a throw destroys `channel`, which unlinks and unmaps what was made. A taken
  // name (a collision, or someone who claimed it) only costs a fresh draw; 16 taken in a row
  // mean 16 collisions of random 64-bit values, i.e. names claimed by guessing: an error.
  constexpr int kAttempts = 16;
  for (int attempt = 0; attempt < kAttempts && ch.own_.data() == nullptr; ++attempt) {
    ch.instance_ = random_instance_token();
    ch.segment_names_[options.rank] = ch.segment_name_of(options.rank, ch.instance_);
    bool taken = false;
    ch.own_ = Segment::create(ch.segment_names_[options.rank], ch.segment_bytes_, &taken);
  }
  if (ch.own_.data() == nullptr) {
    throw ShmError(Kind::kSetup, -1,
                   ch.context() + ": cannot create a shared-memory segment: " +
                       std::to_string(kAttempts) + " random names '/" + options.name + "-r" +
                       std::to_string(options.rank) + "-<random>' in a row were taken");
  }
  auto* h = new (ch.own_.data()) layout::SegmentHeader();
  layout::Identity& id = h->identity;
  id.version = layout::kVersion;
  id.rank = static_cast<uint32_t>(options.rank);
  id.size = static_cast<uint32_t>(options.size);
  id.slot_bytes = options.slot_bytes;
  id.slot_stride = ch.slot_stride_;
  id.token = ch.token_;
  id.instance = ch.instance_;
  id.pid = static_cast<uint64_t>(ch.self_.pid);
  id.pid_ns = ch.self_.pid_ns;
  id.start_time = ch.self_.start_time;
  id.magic.store(layout::kMagic, kRelease);
  ch.bases_[options.rank] = ch.own_.data();
  return channel;
}

Channel::~Channel() {
  if (own_.data() == nullptr) return;  // create() failed before making the segment
  if (foreign()) return;               // a forked child: the members only unmap
  layout::SegmentHeader* h = own_header();
  uint64_t open = layout::kStateOpen;
  if (h->state.value.compare_exchange_strong(open, layout::kStateAborting,
                                             std::memory_order_acq_rel)) {
    const std::string why = "closed its channel after finishing step " + std::to_string(finished_);
    const size_t n = std::min(why.size(), layout::kReasonBytes - 1);
    std::memcpy(h->reason, why.data(), n);
    h->reason[n] = '\0';
    h->state.value.store(layout::kStateClosed, kRelease);
  }
  unlink_own();
}

void Channel::unlink_own() noexcept {
  if (unlinked_ || own_.data() == nullptr || foreign()) return;
  Segment::unlink(own_.name());
  unlinked_ = true;
}

layout::SegmentHeader* Channel::own_header() const {
  return reinterpret_cast<layout::SegmentHeader*>(own_.data());
}

const layout::SegmentHeader* Channel::header(int rank) const {
  return reinterpret_cast<const layout::SegmentHeader*>(bases_[rank]);
}

std::string Channel::context() const {
  return (options_.label.empty() ? "channel '" + options_.name + "'" : options_.label) + ", rank " +
         std::to_string(options_.rank) + " of " + std::to_string(options_.size);
}

std::string Channel::describe(const Fingerprint& fp) const {
  return "{" + (options_.describe ? options_.describe(fp) : default_description(fp)) + "}";
}

std::string Channel::describe_peer_progress(int peer) const {
  const layout::SegmentHeader* h = header(peer);
  const uint64_t published = h->published.value.load(kAcquire);
  std::string text =
      "rank " + std::to_string(peer) + " has published up to step " + std::to_string(published);
  if (published > 0) {
    const layout::FingerprintRecord& rec = h->fingerprints[published % 2];
    const uint64_t seq = rec.seq.load(kRelaxed);
    text += " (step " + std::to_string(seq) + ": " + describe(read_record(rec)) + ")";
  }
  return text + " and finished up to step " + std::to_string(h->finished.value.load(kAcquire));
}

std::string Channel::own_reason() const {
  const layout::SegmentHeader* h = own_header();
  if (h == nullptr) return "aborted before its segment existed";
  // Another thread of this process may be writing the reason right now (kStateAborting).
  for (int i = 0; i < 10000 && h->state.value.load(kAcquire) == layout::kStateAborting; ++i) {
    sched_yield();
  }
  return reason_text(*h);
}

void Channel::mark_aborted(const std::string& why) const noexcept {
  broken_.store(true, kRelease);
  layout::SegmentHeader* h = own_header();
  if (h == nullptr || foreign()) return;
  uint64_t open = layout::kStateOpen;
  if (!h->state.value.compare_exchange_strong(open, layout::kStateAborting,
                                              std::memory_order_acq_rel)) {
    return;  // aborted before: the first reason stays
  }
  const size_t n = std::min(why.size(), layout::kReasonBytes - 1);
  std::memcpy(h->reason, why.data(), n);
  h->reason[n] = '\0';
  h->state.value.store(layout::kStateAborted, kRelease);
}

void Channel::abort(const std::string& why) noexcept { mark_aborted(why); }

void Channel::fail(Kind kind, int peer, const std::string& message) const {
  const std::string text = context() + ": " + message;
  mark_aborted(text);  // keeps the first reason if this rank was aborted before
  throw ShmError(kind, peer, text);
}

void Channel::check_usable(const char* call) const {
  if (foreign()) {
    throw ShmError(Kind::kForked, -1,
                   context() + ": " + call + "() in process " + std::to_string(this_pid()) +
                       ", a fork of process " + std::to_string(self_.pid) +
                       " that set up this channel: a forked child cannot use its parent's "
                       "shared-memory channel (it would write into the parent's segment); "
                       "set up a new group in the child");
  }
  if (broken()) {
    throw ShmError(
        Kind::kBroken, -1,
        context() + ": " + call + "() on a broken channel (aborted: " + own_reason() + ")");
  }
  if (!mapped_ && options_.size > 1) {
    fail(Kind::kUsage, -1, std::string(call) + "() before map_peers()");
  }
}

void Channel::check_in_flight(const char* call, const Step& step) const {
  if (step.seq <= finished_ || step.seq > begun_) {
    fail(Kind::kUsage, -1,
         std::string(call) + "(step " + std::to_string(step.seq) +
             "): not in flight (begun up to step " + std::to_string(begun_) +
             ", finished up to step " + std::to_string(finished_) + ")");
  }
  if (step.buffer != static_cast<int>(step.seq % 2) || step.fp != fingerprints_[step.seq % 2]) {
    fail(Kind::kUsage, -1,
         std::string(call) + "(step " + std::to_string(step.seq) +
             "): the Step was altered after begin() (buffer or fingerprint differs)");
  }
}

bool Channel::peer_identity_ok(int peer, std::string* problem) const {
  const layout::Identity& id = header(peer)->identity;
  auto bad = [&](const std::string& what, uint64_t got, uint64_t expected) {
    *problem = what + " is " + std::to_string(got) + ", expected " + std::to_string(expected);
    return false;
  };
  const uint64_t magic = id.magic.load(kAcquire);
  if (magic != layout::kMagic) {
    return bad(
        "magic (0 = header not initialised yet: every rank must finish create() "
        "before any rank calls map_peers())",
        magic, layout::kMagic);
  }
  if (id.version != layout::kVersion) return bad("layout version", id.version, layout::kVersion);
  if (id.rank != static_cast<uint32_t>(peer)) return bad("rank", id.rank, peer);
  if (id.size != static_cast<uint32_t>(options_.size)) return bad("size", id.size, options_.size);
  if (id.slot_bytes != options_.slot_bytes) {
    return bad("slot_bytes", id.slot_bytes, options_.slot_bytes);
  }
  if (id.slot_stride != slot_stride_) return bad("slot stride", id.slot_stride, slot_stride_);
  if (id.token != token_) return bad("token", id.token, token_);
  return true;
}

void Channel::map_peers(const std::vector<uint64_t>& instance_tokens) {
  if (mapped_) return;
  if (broken() || foreign()) check_usable("map_peers");
  if (instance_tokens.size() != static_cast<size_t>(options_.size) ||
      instance_tokens[options_.rank] != instance_) {
    throw ShmError(Kind::kSetup, -1,
                   context() + ": map_peers() needs every rank's instance token, this rank's " +
                       "at index " + std::to_string(options_.rank) + "; got " +
                       std::to_string(instance_tokens.size()) + " tokens for " +
                       std::to_string(options_.size) + " ranks");
  }
  // On any failure the peers mapped so far are unmapped again (by `peers`' destructor).
  std::vector<Segment> peers(options_.size);
  auto forget_peers = [this] {
    for (int q = 0; q < options_.size; ++q) {
      if (q != options_.rank) bases_[q] = nullptr;
    }
  };
  for (int r = 0; r < options_.size; ++r) {
    if (r == options_.rank) continue;
    segment_names_[r] = segment_name_of(r, instance_tokens[r]);
    try {
      peers[r] = Segment::open(segment_names_[r], segment_bytes_, Segment::Access::kReadOnly);
    } catch (const ShmError& e) {
      forget_peers();
      throw ShmError(Kind::kSetup, r,
                     context() + ": cannot map the segment of rank " + std::to_string(r) +
                         " (did it create() before the barrier?): " +
                         std::string(e.what()).substr(std::strlen("flashcomm shm: ")));
    }
    bases_[r] = peers[r].data();
    std::string problem;
    if (!peer_identity_ok(r, &problem)) {
      forget_peers();
      throw ShmError(Kind::kSetup, r,
                     context() + ": the segment '" + segment_names_[r] + "' of rank " +
                         std::to_string(r) + " is not this channel's: its " + problem);
    }
  }
  for (int r = 0; r < options_.size; ++r) {
    if (r == options_.rank) continue;
    const layout::Identity& id = header(r)->identity;
    check_liveness_[r] = self_.pid_ns != 0 && id.pid_ns == self_.pid_ns;
  }
  peers_ = std::move(peers);
  mapped_ = true;
}

bool Channel::probe() const {
  if (options_.size > 1 && !mapped_) return false;
  std::string problem;
  for (int r = 0; r < options_.size; ++r) {
    if (bases_[r] == nullptr || !peer_identity_ok(r, &problem)) return false;
  }
  return true;
}

bool Channel::probe(const std::vector<uint64_t>& instance_tokens) const {
  if (instance_tokens.size() != static_cast<size_t>(options_.size) || !probe()) return false;
  for (int r = 0; r < options_.size; ++r) {
    if (header(r)->identity.instance != instance_tokens[r]) return false;
  }
  return true;
}

void Channel::await(int peer, Awaited what, uint64_t target, const Step& step) {
  const layout::SegmentHeader* h = header(peer);
  const std::atomic<uint64_t>& counter =
      what == Awaited::kPublished ? h->published.value : h->finished.value;
  if (counter.load(kAcquire) >= target) return;

  const WaitPolicy& policy = options_.wait;
  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline = deadline_after(start, options_.timeout);
  Clock::time_point now = start;
  Clock::time_point next_liveness = start + policy.liveness_period;
  std::chrono::nanoseconds sleep = policy.sleep_min;
  // What this rank waits for, and both sides' fingerprints, for the messages below.
  auto task = [&] {
    return what == Awaited::kPublished
               ? "publish step " + std::to_string(target)
               : "finish step " + std::to_string(target) + " (its buffer is needed for step " +
                     std::to_string(step.seq) + ")";
  };
  auto details = [&] {
    return "; this rank's step " + std::to_string(step.seq) + ": " + describe(step.fp) + "; " +
           describe_peer_progress(peer);
  };
  for (uint32_t round = 1;; ++round) {
    if (counter.load(kAcquire) >= target) return;
    if (broken()) check_usable("wait");  // abort() from another thread
    const uint64_t state = h->state.value.load(kAcquire);
    if (state == layout::kStateAborted || state == layout::kStateClosed) {
      // The final state is stored after the peer's last counter update: recheck once.
      if (counter.load(kAcquire) >= target) return;
      fail(Kind::kPeerAborted, peer,
           "rank " + std::to_string(peer) +
               (state == layout::kStateClosed ? " " + reason_text(*h)
                                              : " aborted (\"" + reason_text(*h) + "\")") +
               " while this rank waited for it to " + task() + details());
    }
    const Clock::duration elapsed = now - start;
    if (elapsed < policy.spin) {
      cpu_relax();
      if (round % 16 != 0) continue;  // read the clock every 16 pauses only
    } else if (elapsed < policy.yield) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::min<Clock::duration>(sleep, deadline - now));
      sleep = std::min(sleep * 2, policy.sleep_max);
    }
    now = Clock::now();
    if (check_liveness_[peer] && now >= next_liveness) {
      next_liveness = now + policy.liveness_period;
      const layout::Identity& id = h->identity;
      const ProcessId owner{static_cast<int64_t>(id.pid), id.pid_ns, id.start_time};
      if (process_liveness(owner) == Liveness::kGone) {
        if (counter.load(kAcquire) >= target) return;
        // A peer that closed or aborted, then exited, since this round's state check is
        // reported with its reason (by the next round), not as merely dead.
        const uint64_t last = h->state.value.load(kAcquire);
        if (last == layout::kStateAborted || last == layout::kStateClosed) continue;
        fail(Kind::kPeerDead, peer,
             "rank " + std::to_string(peer) + " (pid " + std::to_string(id.pid) +
                 ") died while this rank waited for it to " + task() + details());
      }
    }
    if (now >= deadline) {
      if (counter.load(kAcquire) >= target) return;
      fail(Kind::kTimeout, peer,
           "timed out after " + std::to_string(options_.timeout.count()) + " ms waiting for rank " +
               std::to_string(peer) + " to " + task() + " (it never arrived)" + details());
    }
  }
}

Channel::Step Channel::begin(const Fingerprint& fp) {
  check_usable("begin");
  const uint64_t seq = begun_ + 1;
  if (published_ != begun_) {
    fail(Kind::kUsage, -1,
         "begin(step " + std::to_string(seq) + ") before publish(step " + std::to_string(begun_) +
             ")");
  }
  if (finished_ + 2 < seq) {
    fail(Kind::kUsage, -1,
         "begin(step " + std::to_string(seq) + ") before finish(step " +
             std::to_string(finished_ + 1) + "): at most two steps may be in flight");
  }
  const Step step{seq, static_cast<int>(seq % 2), fp};
  if (seq > 2) {
    for (int q = 0; q < options_.size; ++q) {
      if (q != options_.rank) await(q, Awaited::kFinished, seq - 2, step);
    }
  }
  fingerprints_[seq % 2] = fp;
  begun_ = seq;
  return step;
}

uint8_t* Channel::slot(int rank, const Step& step) const {
  check_usable("slot");
  if (rank < 0 || rank >= options_.size) {
    fail(Kind::kUsage, -1,
         "slot(rank " + std::to_string(rank) + "): rank must be in [0, " +
             std::to_string(options_.size) + ")");
  }
  check_in_flight("slot", step);
  return bases_[rank] + layout::kHeaderBytes + static_cast<size_t>(step.buffer) * slot_stride_;
}

void Channel::publish(const Step& step) {
  check_usable("publish");
  if (step.seq != begun_ || published_ == begun_) {
    fail(Kind::kUsage, -1,
         "publish(step " + std::to_string(step.seq) + "): only the last begun step (" +
             std::to_string(begun_) + ") may be published, once (published up to step " +
             std::to_string(published_) + ")");
  }
  check_in_flight("publish", step);
  layout::SegmentHeader* h = own_header();
  const Fingerprint& fp = fingerprints_[step.seq % 2];
  layout::FingerprintRecord& rec = h->fingerprints[step.seq % 2];
  rec.seq.store(step.seq, kRelaxed);
  rec.kind_dtype.store(uint64_t{fp.kind} << 32 | fp.dtype, kRelaxed);
  rec.bytes.store(fp.bytes, kRelaxed);
  rec.call.store(fp.call, kRelaxed);
  rec.piece.store(fp.piece, kRelaxed);
  rec.tag[0].store(fp.tag[0], kRelaxed);
  rec.tag[1].store(fp.tag[1], kRelaxed);
  // Release: the buffer contents and the record above are visible to every acquire load
  // that reads this value (channel.h, "Memory ordering").
  h->published.value.store(step.seq, kRelease);
  published_ = step.seq;
}

void Channel::wait_peer(const Step& step, int peer) {
  check_usable("wait_peer");
  if (peer < 0 || peer >= options_.size) {
    fail(Kind::kUsage, -1,
         "wait_peer(peer " + std::to_string(peer) + "): peer must be in [0, " +
             std::to_string(options_.size) + ")");
  }
  check_in_flight("wait_peer", step);
  if (peer == options_.rank) return;
  await(peer, Awaited::kPublished, step.seq, step);
  const layout::FingerprintRecord& rec = header(peer)->fingerprints[step.seq % 2];
  const uint64_t seq = rec.seq.load(kRelaxed);
  const Fingerprint theirs = read_record(rec);
  if (seq != step.seq) {
    fail(Kind::kBroken, peer,
         "rank " + std::to_string(peer) + "'s record of step " + std::to_string(step.seq) +
             " holds step " + std::to_string(seq) + ": its segment was overwritten");
  }
  const Fingerprint& ours = fingerprints_[step.seq % 2];
  if (theirs != ours) {
    fail(Kind::kMismatch, peer,
         "step " + std::to_string(step.seq) +
             " differs between ranks (their collective calls diverged): this rank has " +
             describe(ours) + ", rank " + std::to_string(peer) + " has " + describe(theirs));
  }
}

void Channel::wait_all(const Step& step) {
  for (int r = 0; r < options_.size; ++r) wait_peer(step, r);
}

void Channel::finish(const Step& step) {
  check_usable("finish");
  if (step.seq != finished_ + 1 || step.seq > published_) {
    fail(Kind::kUsage, -1,
         "finish(step " + std::to_string(step.seq) + "): expected step " +
             std::to_string(finished_ + 1) + ", after its publish() (published up to step " +
             std::to_string(published_) + ")");
  }
  check_in_flight("finish", step);
  // Release: this rank's reads of step.seq happen-before a peer's begin(step.seq + 2).
  own_header()->finished.value.store(step.seq, kRelease);
  finished_ = step.seq;
}

std::vector<std::string> reclaim_dead_segments(const std::string& prefix) {
  std::vector<std::string> removed;
  DIR* dir = ::opendir("/dev/shm");
  if (dir == nullptr || prefix.empty()) {
    if (dir != nullptr) ::closedir(dir);
    return removed;
  }
  const ProcessId self = current_process();
  while (const dirent* entry = ::readdir(dir)) {
    const std::string file = entry->d_name;
    if (file.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string name = "/" + file;
    try {
      check_segment_name(name);
    } catch (const ShmError&) {
      continue;
    }
    const int fd = shm_open(name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC, 0);
    if (fd < 0) continue;
    struct stat st{};
    bool dead = false;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == ::geteuid() &&
        static_cast<uint64_t>(st.st_size) >= layout::kHeaderBytes) {
      void* addr = ::mmap(nullptr, layout::kHeaderBytes, PROT_READ, MAP_SHARED, fd, 0);
      if (addr != MAP_FAILED) {
        dead = abandoned(*static_cast<const layout::SegmentHeader*>(addr),
                         static_cast<uint64_t>(st.st_size), self);
        ::munmap(addr, layout::kHeaderBytes);
      }
    }
    ::close(fd);
    // Still the file that was judged (not replaced since): then remove it.
    struct stat now{};
    if (dead && ::stat(("/dev/shm/" + file).c_str(), &now) == 0 && now.st_ino == st.st_ino &&
        now.st_dev == st.st_dev && ::shm_unlink(name.c_str()) == 0) {
      removed.push_back(name);
    }
  }
  ::closedir(dir);
  return removed;
}

}  // namespace flashcomm::core::shm
