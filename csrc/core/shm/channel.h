// The torch-free shared-memory exchange protocol of the host transport: the ranks of one group
// on one host move bytes through POSIX shared memory, step by step, with every wait bounded and
// every failure (timeout, dead or aborted peer, diverging call sequences) turned into the same
// kind of error on every rank.
//
// Segments. Rank r owns one segment, "/<name>-r<r>-<x>" (layout.h), x = rank r's random
// instance token in hex, drawn by create() (again while the name is taken): a header page,
// then two buffers of slot_bytes each (page-aligned), buffer b used by the steps with
// seq % 2 == b. Only rank r stores into it; every peer maps it read-only. No rank's name can
// be told from another's, so no one can claim a rank's name before it exists.
//
// Setup, with an exchange among the ranks (through the caller's c10d group) between phases:
//   Channel::create() -> all-gather instance_token() -> map_peers(tokens) -> barrier
//   -> unlink_own()
// After unlink_own() on every rank, nothing of the channel is left in /dev/shm, whatever
// happens to the processes later (a SIGKILL included): the mappings keep the memory alive.
//
// Steps. Every rank runs the same sequence of steps, seq = 1, 2, 3, ...:
//   Step s = begin(fp);      // waits until every peer finished step s-2 (buffer s%2 is free)
//   write slot(rank, s);     // own buffer, plain stores
//   publish(s);              // own buffer + fingerprint visible to the peers
//   wait_peer(s, p) / wait_all(s);   // p published s, with a fingerprint equal to ours
//   read slot(p, s);         // p's buffer, read-only
//   finish(s);               // this rank needs nothing more of step s
// A rank writes its own buffer of step s only between begin(s) and publish(s) (peers may read
// it from then until they finish(s)), and reads a peer's only between wait_peer(s, p) and
// finish(s). At most two steps are in flight (begun, not finished) at once, so a rank may
// write step s+1 while it still reads step s. Order rules (ShmError(kUsage) otherwise, which
// also aborts): begin(s) needs publish(s-1) and finish(s-2); publish(s) once, after begin(s);
// finish(s) after publish(s) and finish(s-1); wait_peer/slot only for steps in flight.
//
// Memory ordering. Per rank, `published` and `finished` are monotonic std::atomic<uint64_t>
// counters in the owner's header, each alone in its cache line; only the owner stores them.
//  - publish(s): the caller's plain stores into buffer s%2 and the fingerprint record (relaxed)
//    come first in program order, then published.store(s, release).
//  - wait_peer(s, p): loops on p.published.load(acquire) until >= s. The acquire load reads
//    the value of p's release store (or a later one of p's), so p's stores into its buffer for
//    step s happen-before everything this rank does after wait_peer returns: the data is
//    visible without further fences.
//  - finish(s): all of this rank's reads of step s come first, then finished.store(s, release).
//  - begin(s) on rank p: loops on q.finished.load(acquire) >= s-2 for every peer q. This
//    pairs with q's release in finish(s-2): q's reads of p's buffer s%2 for step s-2
//    happen-before p's stores into it for step s, so a writer never overwrites data a reader
//    still reads.
//  - A reader waiting for p's step s can never see step s+2 instead: p's begin(s+2) waits for
//    this rank's finish(s), which comes after this rank's wait. When the wait returns, p's
//    `published` is s or s+1, and s+1 lives in the other buffer. Hence buffer s%2 and
//    fingerprint record s%2 hold step s until this rank calls finish(s).
//  - state (abort/close) is stored with release after the reason text; a waiter that loads a
//    final state (acquire) reads the reason, and rechecks its wait condition once before
//    failing, so a peer that published and then closed is never reported as aborted.
//
// Failures. Every wait is bounded by options.timeout and polls the awaited peer's state
// (abort/close) on every round and its process (ChannelOptions::wait.liveness_period) when
// the peer lives in this pid namespace. Any error raised by a wait, or kUsage, first aborts
// this rank (its header says so, with the message as reason), so the peers blocked on it
// fail fast with kPeerAborted instead of running into their own timeout. A fingerprint
// mismatch is seen by every rank that compares against the odd one out, so each rank of a
// diverged group gets kMismatch (or kPeerAborted when it was waiting on a rank that already
// failed). Destroying a Channel closes it: peers still waiting for a step this rank will
// never reach fail with kPeerAborted ("closed").
//
// Threads. A Channel is driven by one thread at a time. abort() and broken() may be called
// from any thread at any time (e.g. a watchdog); a wait in progress then fails with kBroken.
//
// Fork. A Channel belongs to the process that created it. In a child forked after create(),
// the mappings are the parent's own memory, so nothing there ever stores into them or removes
// a name: every step call throws kForked, abort() only marks the child's copy broken, and the
// destructor only unmaps.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/shm/error.h"
#include "core/shm/layout.h"
#include "core/shm/segment.h"
#include "core/shm/sys.h"

namespace flashcomm::core::shm {

inline constexpr int kMaxRanks = 64;
// Upper bound of ChannelOptions::slot_bytes (keeps every offset computation far from overflow).
inline constexpr size_t kMaxSlotBytes = size_t{1} << 40;
// Longest ChannelOptions::name (the segment name adds "/" and "-r<rank>").
inline constexpr size_t kMaxChannelNameLength = 200;

// What collective a step belongs to; compared between ranks at every step, so every field
// must be rank-invariant (the same on every rank for the same step).
struct Fingerprint {
  uint32_t kind = 0;   // caller's collective kind code
  uint32_t dtype = 0;  // caller's dtype code
  uint64_t bytes = 0;  // total payload bytes of the collective
  uint64_t call = 0;   // caller's collective sequence number on this channel
  uint32_t piece = 0;  // index of this step within a streamed collective
  uint64_t tag[2] = {0, 0};  // caller-defined, e.g. the calling op and its token count

  bool operator==(const Fingerprint& o) const {
    return kind == o.kind && dtype == o.dtype && bytes == o.bytes && call == o.call &&
           piece == o.piece && tag[0] == o.tag[0] && tag[1] == o.tag[1];
  }
  bool operator!=(const Fingerprint& o) const { return !(*this == o); }
};

// "kind 1 dtype 2 bytes 4096 call 7 piece 0": the text used when no describe() is given.
std::string default_description(const Fingerprint& fp);

// How a wait spends its time: spin with a pause instruction, then sched_yield, then sleep
// with a period doubling from sleep_min to sleep_max; the awaited peer's process is checked
// once per liveness_period (the first time after one period). A peer that has already
// published costs one acquire load, no waiting. The defaults come from a 2-rank ping-pong
// on a 2-core machine shared with other work (rough figures):
//  - when the ranks do not each have a core, the peer is descheduled while this rank spins,
//    so every µs of spin costs about 2 µs a step: 1.7 µs a step without spin, ~3 with 0.5 µs,
//    ~6 with 2 µs, ~12 with 5 µs. With a core each, a step took 0.3 µs, and a spin only saves
//    the yield's system call over yielding at once. Hence a spin of about one µs;
//  - a yield returns at once when no one else wants the core, so the yield phase still reacts
//    within ~1 µs, and it hands the core over when ranks share cores; it burns a core for at
//    most `yield`;
//  - then the waiter sleeps: a peer 2 ms late cost the waiter ~13% of a core, 20 ms late
//    ~7%, and the wake-up comes at most sleep_max (+ timer slack) after the peer's publish.
struct WaitPolicy {
  std::chrono::nanoseconds spin{std::chrono::microseconds(1)};     // pause-spin up to here
  std::chrono::nanoseconds yield{std::chrono::microseconds(200)};  // then sched_yield up to here
  std::chrono::nanoseconds sleep_min{std::chrono::microseconds(20)};
  std::chrono::nanoseconds sleep_max{std::chrono::microseconds(200)};
  std::chrono::nanoseconds liveness_period{std::chrono::milliseconds(5)};
};

struct ChannelOptions {
  // The same on every rank, e.g. "fc-g<group>": 1..kMaxChannelNameLength characters of
  // [A-Za-z0-9._-]. Rank r's segment is "/<name>-r<r>-<its instance token in hex>".
  std::string name;
  int rank = 0;  // 0 <= rank < size
  int size = 1;  // 1 <= size <= kMaxRanks; the same on every rank
  // Bytes of each of this rank's two buffers; 1..kMaxSlotBytes, the same on every rank.
  size_t slot_bytes = 0;
  // Bound of every wait (> 0); a deadline past the clock's range saturates (never times out).
  std::chrono::milliseconds timeout{300000};
  // Names the group in messages, e.g. "group 'tp' (c10d name '3')"; default: the channel name.
  std::string label;
  // Optional fingerprint -> text for messages (default_description when empty).
  std::function<std::string(const Fingerprint&)> describe;
  WaitPolicy wait;
};

class Channel {
 public:
  // One exchange step. `buffer` = seq % 2; `fp` is this rank's fingerprint of the step.
  struct Step {
    uint64_t seq = 0;
    int buffer = 0;
    Fingerprint fp;
  };

  // Validates the options (kSetup naming the bad field) and creates this rank's segment under
  // a fresh random name, header initialised (magic, version, rank, size, slot size, token,
  // instance token, pid, pid namespace, start time). A failure leaves nothing behind.
  static std::unique_ptr<Channel> create(const ChannelOptions& options);

  // Opens and maps every peer's segment read-only (rank r's name follows from
  // instance_tokens[r], rank r's instance_token() as the caller all-gathered it) and checks
  // its size and header (kSetup naming the peer otherwise; the segments mapped so far are
  // released). Idempotent once it succeeded.
  void map_peers(const std::vector<uint64_t>& instance_tokens);
  // True iff every peer is mapped and its header holds the magic, version, rank, size, slot
  // size and token this rank expects: proof that this process sees the peers' memory.
  bool probe() const;
  // probe(), and every peer's header holds the instance token that rank reported
  // (instance_tokens[r] = rank r's instance_token(), all-gathered by the caller through its
  // ProcessGroup): proof that the segment mapped as rank r's was made by rank r of this very
  // setup, not by an unrelated process that used the same name. False on a size mismatch.
  bool probe(const std::vector<uint64_t>& instance_tokens) const;
  // Random 64-bit value drawn by create(), stored in this rank's header and in its name.
  uint64_t instance_token() const { return instance_; }
  // This rank's segment name ("/<name>-r<rank>-<x>").
  const std::string& segment_name() const { return segment_names_[options_.rank]; }
  // Removes this rank's name from /dev/shm (mappings stay). Idempotent; the destructor does it
  // if it was never called.
  void unlink_own() noexcept;
  // Closes the channel (peers waiting on this rank fail fast), unlinks if needed, unmaps. In a
  // forked child: only unmaps.
  ~Channel();

  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  Step begin(const Fingerprint& fp);
  // rank's buffer of `step` (slot_bytes bytes, page-aligned): writable for this rank's own,
  // read-only (faults on store) for a peer's, whose contents are valid after wait_peer().
  uint8_t* slot(int rank, const Step& step) const;
  void publish(const Step& step);
  // Bounded wait until `peer` published `step`; its fingerprint must equal ours (kMismatch
  // otherwise). peer == rank() returns at once.
  void wait_peer(const Step& step, int peer);
  // wait_peer for every peer, in rank order.
  void wait_all(const Step& step);
  void finish(const Step& step);

  // Marks this rank broken in its shared header with `why` (at most 255 bytes kept): peers
  // blocked on it fail fast with kPeerAborted quoting `why`; later calls on this channel throw
  // kBroken. Only the first abort's reason is kept. Thread-safe, idempotent.
  void abort(const std::string& why) noexcept;
  bool broken() const { return broken_.load(std::memory_order_acquire); }
  // True in a process other than the one that created this channel (a forked child).
  bool foreign() const { return this_pid() != self_.pid; }

  size_t slot_bytes() const { return options_.slot_bytes; }
  int rank() const { return options_.rank; }
  int size() const { return options_.size; }
  const std::string& name() const { return options_.name; }
  // Last seq this rank published / finished (0 before the first step).
  uint64_t published() const { return published_; }
  uint64_t finished() const { return finished_; }

 private:
  explicit Channel(const ChannelOptions& options);

  enum class Awaited { kPublished, kFinished };
  void await(int peer, Awaited what, uint64_t target, const Step& step);
  // Aborts this rank with `message` as reason (unless aborted before), then throws.
  [[noreturn]] void fail(ShmError::Kind kind, int peer, const std::string& message) const;
  void mark_aborted(const std::string& why) const noexcept;
  layout::SegmentHeader* own_header() const;
  const layout::SegmentHeader* header(int rank) const;
  void check_usable(const char* call) const;
  void check_in_flight(const char* call, const Step& step) const;
  std::string context() const;
  std::string describe(const Fingerprint& fp) const;
  std::string describe_peer_progress(int peer) const;
  std::string own_reason() const;
  bool peer_identity_ok(int peer, std::string* problem) const;
  std::string segment_name_of(int rank, uint64_t instance) const;

  ChannelOptions options_;
  std::vector<std::string> segment_names_;  // [rank]; peers' set by map_peers()
  size_t slot_stride_ = 0;
  size_t segment_bytes_ = 0;
  uint64_t token_ = 0;
  uint64_t instance_ = 0;
  ProcessId self_;
  Segment own_;
  std::vector<Segment> peers_;        // [rank]; own entry empty
  std::vector<uint8_t*> bases_;       // [rank] segment start (read-only for peers); null: unmapped
  std::vector<bool> check_liveness_;  // [rank] same pid namespace as ours
  bool mapped_ = false;
  bool unlinked_ = false;
  uint64_t begun_ = 0, published_ = 0, finished_ = 0;  // this rank's progress
  Fingerprint fingerprints_[2];                        // of the steps in flight, [seq % 2]
  mutable std::atomic<bool> broken_{false};
};

// Removes the segments of /dev/shm whose names start with `prefix` and that provably belong to
// dead channels: owned by this user, a complete channel header (magic, version, shape and file
// size consistent), created in this pid namespace by a process that is gone (no such pid, a
// zombie, or the pid now runs a process started at another time). Anything unclear (another
// namespace, an unknown start time with a live pid, an unreadable header) is kept. Such a
// segment is left by a rank killed between create() and unlink_own(). Returns the names
// removed ("/..."); never throws.
std::vector<std::string> reclaim_dead_segments(const std::string& prefix);

}  // namespace flashcomm::core::shm
