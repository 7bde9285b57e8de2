// GoogleTest of the torch-free shared-memory protocol (csrc/core/shm): segments in-process,
// channels over real forked rank processes.
//
// Ranks are fork()ed children of the test process, which has no threads at that point (gtest
// starts none). A child never uses gtest: it throws TestFailure on a failed check, and its exit
// status (0 = every check held) is asserted by the parent, which also reaps, kills on hang and
// checks that /dev/shm holds nothing of the test's names afterwards.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/shm/channel.h"
#include "core/shm/segment.h"

using namespace flashcomm::core::shm;
using Kind = ShmError::Kind;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

namespace {

constexpr milliseconds kSafeTimeout{20000};  // channels whose waits should all succeed
constexpr auto kHarnessDeadline = std::chrono::seconds(40);  // a child still running then hangs

// ---------------------------------------------------------------------------------------------
// Harness

struct TestFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void require(bool condition, const std::string& what) {
  if (!condition) throw TestFailure(what);
}

// Runs `f`, which must throw ShmError; returns it.
template <typename F>
ShmError expect_shm_error(F&& f, const std::string& what) {
  try {
    f();
  } catch (const ShmError& e) {
    return e;
  }
  throw TestFailure(what + ": expected a ShmError, none was thrown");
}

void require_kind(const ShmError& e, Kind kind, const std::string& what) {
  require(e.kind() == kind, what + ": expected a " + kind_name(kind) + " error, got " +
                                kind_name(e.kind()) + ": " + e.what());
}

void require_contains(const std::string& text, const std::string& part, const std::string& what) {
  require(text.find(part) != std::string::npos,
          what + ": expected the message to contain '" + part + "', got: " + text);
}

// Unique per test (and per process): the channel and segment names of a test start with it.
std::string fresh_prefix() {
  static int counter = 0;
  return "fctest-" + std::to_string(::getpid()) + "-" + std::to_string(++counter);
}

// Entries of /dev/shm whose name starts with "<prefix>-".
std::vector<std::string> shm_entries(const std::string& prefix) {
  std::vector<std::string> found;
  DIR* dir = ::opendir("/dev/shm");
  if (dir == nullptr) return found;
  const std::string start = prefix + "-";
  while (dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name.compare(0, start.size(), start) == 0) found.push_back(name);
  }
  ::closedir(dir);
  return found;
}

// Asserts that nothing of `prefix` is left in /dev/shm (and removes what is, so one failure
// does not leak into later runs).
void expect_no_shm_left(const std::string& prefix) {
  const std::vector<std::string> left = shm_entries(prefix);
  for (const std::string& name : left) {
    ADD_FAILURE() << "left in /dev/shm: " << name;
    Segment::unlink("/" + name);
  }
}

bool read_byte(int fd, milliseconds timeout) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return false;
  char byte = 0;
  return ::read(fd, &byte, 1) == 1;
}

void write_byte(int fd) {
  const char byte = 1;
  require(::write(fd, &byte, 1) == 1, "pipe write failed");
}

// Barrier among the forked ranks over pipes; rank 0 collects one byte from every other rank
// (on a shared pipe), then answers each on its own pipe. A rank cannot pass round k+1 before
// rank 0 has released round k, so bytes of two rounds never mix.
class PipeBarrier {
 public:
  explicit PipeBarrier(int size) : size_(size), down_(size) {
    if (::pipe(up_) != 0) throw std::runtime_error("pipe");
    for (auto& fds : down_) {
      if (::pipe(fds.data()) != 0) throw std::runtime_error("pipe");
    }
  }
  void wait(int rank) const {
    const milliseconds timeout = kSafeTimeout;
    if (rank == 0) {
      for (int i = 1; i < size_; ++i) require(read_byte(up_[0], timeout), "barrier: no arrival");
      for (int r = 1; r < size_; ++r) write_byte(down_[r][1]);
    } else {
      write_byte(up_[1]);
      require(read_byte(down_[rank][0], timeout), "barrier: no release");
    }
  }
  void close_all() {
    ::close(up_[0]);
    ::close(up_[1]);
    for (auto& fds : down_) {
      ::close(fds[0]);
      ::close(fds[1]);
    }
  }

 private:
  int size_;
  int up_[2];
  std::vector<std::array<int, 2>> down_;
};

struct RankContext {
  int rank = 0;
  int size = 1;
  std::string prefix;
  const PipeBarrier* barrier = nullptr;
  int signal_fd = -1;   // write end: one byte tells the parent "now"
  int release_fd = -1;  // read end: EOF once the parent releases lingering ranks
  uint64_t* board = nullptr;  // kMaxRanks words shared by the ranks (MAP_SHARED, anonymous)

  void sync() const { barrier->wait(rank); }
  // Every rank's `mine`, by rank (what a c10d all-gather does for the real transport).
  std::vector<uint64_t> all_gather(uint64_t mine) const {
    __atomic_store_n(&board[rank], mine, __ATOMIC_RELAXED);
    sync();
    std::vector<uint64_t> all(size);
    for (int r = 0; r < size; ++r) all[r] = __atomic_load_n(&board[r], __ATOMIC_RELAXED);
    sync();  // nobody overwrites the board before everyone has read it
    return all;
  }
  void signal_parent() const { write_byte(signal_fd); }
  // Blocks until the parent closes the release pipe (every other rank has exited).
  void wait_release() const {
    char byte = 0;
    while (::read(release_fd, &byte, 1) > 0) {
    }
  }
};

struct Launch {
  int size = 2;
  // Kept alive (in wait_release) until every other rank has exited.
  int linger_rank = -1;
  // Reaped only after every other rank: a zombie until then if it dies first.
  int reap_last_rank = -1;
  // Runs in the parent right after the fork; `signal_fd` is the read end of the signal pipe.
  std::function<void(const std::vector<pid_t>& pids, int signal_fd)> parent_action;
};

Launch ranks(int size) {
  Launch launch;
  launch.size = size;
  return launch;
}

// Forks launch.size ranks running `body`, waits for all of them (killing every child still
// running after kHarnessDeadline) and returns each rank's wait status (-1: hung).
std::vector<int> run_ranks(const std::string& prefix, const Launch& launch,
                           const std::function<void(RankContext&)>& body) {
  PipeBarrier barrier(launch.size);
  void* board = ::mmap(nullptr, kMaxRanks * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (board == MAP_FAILED) throw std::runtime_error("mmap");
  int signal[2], release[2];
  if (::pipe(signal) != 0 || ::pipe(release) != 0) throw std::runtime_error("pipe");
  std::fflush(stdout);
  std::fflush(stderr);
  std::vector<pid_t> pids(launch.size);
  for (int r = 0; r < launch.size; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork");
    if (pid == 0) {
      ::close(signal[0]);
      ::close(release[1]);
      RankContext ctx{r, launch.size, prefix, &barrier, signal[1], release[0],
                      static_cast<uint64_t*>(board)};
      int status = 0;
      try {
        body(ctx);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "[rank %d of %d] FAILED: %s\n", r, launch.size, e.what());
        status = 1;
      } catch (...) {
        std::fprintf(stderr, "[rank %d of %d] FAILED: unknown exception\n", r, launch.size);
        status = 2;
      }
      std::fflush(stderr);
      std::fflush(stdout);
      ::_exit(status);
    }
    pids[r] = pid;
  }
  barrier.close_all();
  ::close(signal[1]);
  ::close(release[0]);
  if (launch.parent_action) launch.parent_action(pids, signal[0]);
  ::close(signal[0]);

  std::vector<int> statuses(launch.size, -1);
  std::set<int> pending;
  for (int r = 0; r < launch.size; ++r) pending.insert(r);
  bool released = false;
  const Clock::time_point deadline = Clock::now() + kHarnessDeadline;
  while (!pending.empty()) {
    for (auto it = pending.begin(); it != pending.end();) {
      const int r = *it;
      int status = 0;
      if ((r == launch.reap_last_rank && pending.size() > 1) ||
          ::waitpid(pids[r], &status, WNOHANG) != pids[r]) {
        ++it;
        continue;
      }
      statuses[r] = status;
      it = pending.erase(it);
    }
    if (!released &&
        (pending.empty() || (pending.size() == 1 && *pending.begin() == launch.linger_rank))) {
      ::close(release[1]);
      released = true;
    }
    if (Clock::now() > deadline) {
      for (int r : pending) {
        ADD_FAILURE() << "rank " << r << " still running after " << kHarnessDeadline.count()
                      << " s: killed";
        ::kill(pids[r], SIGKILL);
        ::waitpid(pids[r], nullptr, 0);
      }
      break;
    }
    ::usleep(1000);
  }
  if (!released) ::close(release[1]);
  ::munmap(board, kMaxRanks * sizeof(uint64_t));
  return statuses;
}

void expect_clean_exit(const std::vector<int>& statuses, int skip_rank = -1) {
  for (size_t r = 0; r < statuses.size(); ++r) {
    if (static_cast<int>(r) == skip_rank) continue;
    const int st = statuses[r];
    EXPECT_TRUE(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0)
        << "rank " << r << " failed (status " << st << "; its message is on stderr above)";
  }
}

// ---------------------------------------------------------------------------------------------
// Channel helpers used inside the ranks

std::string describe_test_fp(const Fingerprint& fp) {
  return "test-call " + std::to_string(fp.call) + " piece " + std::to_string(fp.piece);
}

ChannelOptions options_for(const RankContext& ctx, const std::string& tag, size_t slot_bytes,
                           milliseconds timeout) {
  ChannelOptions o;
  o.name = ctx.prefix + "-" + tag;
  o.rank = ctx.rank;
  o.size = ctx.size;
  o.slot_bytes = slot_bytes;
  o.timeout = timeout;
  o.label = "test group '" + tag + "'";
  o.describe = describe_test_fp;
  return o;
}

// The setup sequence of channel.h: create -> all-gather the instance tokens -> map_peers ->
// barrier -> unlink_own.
std::unique_ptr<Channel> setup(const RankContext& ctx, const ChannelOptions& options) {
  auto channel = Channel::create(options);
  const std::vector<uint64_t> tokens = ctx.all_gather(channel->instance_token());
  channel->map_peers(tokens);
  require(channel->probe(tokens), "probe(tokens) is false after map_peers()");
  ctx.sync();
  channel->unlink_own();
  return channel;
}

Fingerprint fp_of(uint64_t call, uint32_t piece = 0, uint64_t bytes = 64) {
  Fingerprint fp;
  fp.kind = 7;
  fp.dtype = 3;
  fp.bytes = bytes;
  fp.call = call;
  fp.piece = piece;
  return fp;
}

// Word i of `rank`'s buffer at step `seq` of channel `tag`: differs between ranks, steps,
// channels and positions, so a stale, foreign or shifted buffer is always noticed.
uint64_t pattern(int tag, int rank, uint64_t seq, size_t i) {
  return (uint64_t{static_cast<uint32_t>(tag)} << 60) ^
         (uint64_t{static_cast<uint32_t>(rank)} << 52) ^ (seq << 24) ^ (i * 0x9E3779B97F4A7C15ULL);
}

void fill(uint8_t* slot, size_t bytes, int tag, int rank, uint64_t seq) {
  const size_t words = bytes / 8;
  auto* w = reinterpret_cast<uint64_t*>(slot);
  for (size_t i = 0; i < words; ++i) w[i] = pattern(tag, rank, seq, i);
}

void check(const uint8_t* slot, size_t bytes, int tag, int rank, uint64_t seq) {
  const size_t words = bytes / 8;
  const auto* w = reinterpret_cast<const uint64_t*>(slot);
  for (size_t i = 0; i < words; ++i) {
    if (w[i] != pattern(tag, rank, seq, i)) {
      throw TestFailure("step " + std::to_string(seq) + ": word " + std::to_string(i) +
                        " of rank " + std::to_string(rank) + "'s buffer (channel " +
                        std::to_string(tag) + ") is wrong");
    }
  }
}

void check_all(Channel& ch, const Channel::Step& step, int tag) {
  for (int r = 0; r < ch.size(); ++r) check(ch.slot(r, step), ch.slot_bytes(), tag, r, step.seq);
}

// A random pause: none, a yield, a short spin, a short sleep or (rarely) one long enough that
// the peers' waits reach their sleeping phase.
void random_delay(std::mt19937_64& rng) {
  const int choice = static_cast<int>(rng() % 100);
  if (choice < 40) return;
  if (choice < 60) {
    sched_yield();
  } else if (choice < 80) {
    const auto until = Clock::now() + std::chrono::microseconds(rng() % 20);
    while (Clock::now() < until) {
    }
  } else if (choice < 99) {
    ::usleep(static_cast<useconds_t>(rng() % 200));
  } else {
    ::usleep(2000);
  }
}

// Runs `steps` exchange steps on `ch` with random delays. With `overlap`, a rank may begin
// (and write, publish) step s+1 before it finishes step s, as a pipelined caller would.
void exchange(Channel& ch, int steps, int tag, uint64_t seed, bool overlap) {
  std::mt19937_64 rng(seed);
  std::vector<Channel::Step> open;  // published, not finished (at most one carried over)
  for (int i = 0; i < steps; ++i) {
    random_delay(rng);
    const Channel::Step step = ch.begin(fp_of(i + 1, 0, ch.slot_bytes()));
    require(step.seq == static_cast<uint64_t>(i + 1) && step.buffer == (i + 1) % 2,
            "unexpected seq/buffer");
    fill(ch.slot(ch.rank(), step), ch.slot_bytes(), tag, ch.rank(), step.seq);
    random_delay(rng);
    ch.publish(step);
    // The step carried over from the previous round must finish before this one.
    for (const Channel::Step& old : open) {
      ch.wait_all(old);
      check_all(ch, old, tag);
      ch.finish(old);
    }
    open.clear();
    if (overlap && rng() % 2 == 0 && i + 1 < steps) {
      open.push_back(step);
      continue;
    }
    random_delay(rng);
    // Peers in random order (own rank included: a no-op).
    std::vector<int> order(ch.size());
    for (int r = 0; r < ch.size(); ++r) order[r] = r;
    std::shuffle(order.begin(), order.end(), rng);
    for (int r : order) ch.wait_peer(step, r);
    check_all(ch, step, tag);
    random_delay(rng);
    ch.finish(step);
  }
  for (const Channel::Step& old : open) {
    ch.wait_all(old);
    check_all(ch, old, tag);
    ch.finish(old);
  }
  require(ch.finished() == static_cast<uint64_t>(steps), "not every step finished");
}

// One step of collective `call`: write, publish, wait for every peer, check every buffer.
void exchange_one(Channel& ch, uint64_t call, int tag) {
  const Channel::Step step = ch.begin(fp_of(call));
  fill(ch.slot(ch.rank(), step), ch.slot_bytes(), tag, ch.rank(), step.seq);
  ch.publish(step);
  ch.wait_all(step);
  check_all(ch, step, tag);
  ch.finish(step);
}

class ShmRanks : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override { prefix_ = fresh_prefix(); }
  void TearDown() override { expect_no_shm_left(prefix_); }
  std::string prefix_;
};

// ---------------------------------------------------------------------------------------------
// Segments (in-process)

TEST(ShmSegment, CreateOpenUnlink) {
  const std::string name = "/" + fresh_prefix() + "-seg";
  Segment created = Segment::create(name, 10000);
  ASSERT_NE(created.data(), nullptr);
  EXPECT_EQ(created.size(), 10000u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(created.data()) % 4096, 0u);
  EXPECT_EQ(created.data()[9999], 0);  // fresh contents are zero
  created.data()[123] = 42;
  {
    const Segment reader = Segment::open(name, 10000, Segment::Access::kReadOnly);
    EXPECT_FALSE(reader.writable());
    EXPECT_EQ(reader.data()[123], 42);  // the same memory
  }
  const ShmError wrong_size = expect_shm_error([&] { Segment::open(name, 4096); }, "size");
  EXPECT_EQ(wrong_size.kind(), Kind::kSetup);
  EXPECT_NE(std::string(wrong_size.what()).find("10000 bytes, expected 4096"), std::string::npos)
      << wrong_size.what();
  Segment::unlink(name);
  Segment::unlink(name);               // a missing name is not an error
  EXPECT_EQ(created.data()[123], 42);  // the mapping outlives the name
  const ShmError gone = expect_shm_error([&] { Segment::open(name, 10000); }, "unlinked");
  EXPECT_EQ(gone.kind(), Kind::kSetup);
  EXPECT_NE(std::string(gone.what()).find("ENOENT"), std::string::npos) << gone.what();

  Segment moved = std::move(created);
  EXPECT_EQ(created.data(), nullptr);
  EXPECT_EQ(moved.data()[123], 42);
}

TEST(ShmSegment, CreateOfAnExistingNameFailsAndKeepsIt) {
  const std::string prefix = fresh_prefix();
  const std::string name = "/" + prefix + "-seg";
  Segment first = Segment::create(name, 4096);
  first.data()[0] = 7;
  const ShmError e = expect_shm_error([&] { Segment::create(name, 4096); }, "EEXIST");
  EXPECT_EQ(e.kind(), Kind::kSetup);
  EXPECT_EQ(e.peer(), -1);
  const std::string text = e.what();
  EXPECT_NE(text.find("EEXIST"), std::string::npos) << text;
  EXPECT_NE(text.find("File exists"), std::string::npos) << text;
  EXPECT_NE(text.find(name), std::string::npos) << text;
  EXPECT_NE(text.find("4096 bytes"), std::string::npos) << text;
  // The failed create must not remove the segment that was there.
  const Segment again = Segment::open(name, 4096);
  EXPECT_EQ(again.data()[0], 7);
  Segment::unlink(name);
  expect_no_shm_left(prefix);
}

TEST(ShmSegment, ImpossibleSizesFailCleanly) {
  const std::string prefix = fresh_prefix();
  for (size_t bytes : {size_t{0}, size_t{1} << 62, ~size_t{0}}) {
    const std::string name = "/" + prefix + "-big";
    const ShmError e = expect_shm_error([&] { Segment::create(name, bytes); }, "size");
    EXPECT_EQ(e.kind(), Kind::kSetup);
    EXPECT_NE(std::string(e.what()).find(std::to_string(bytes) + " bytes"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
  }
  expect_no_shm_left(prefix);
}

TEST(ShmSegment, InvalidNamesAreRejected) {
  for (const std::string& name : {std::string(""), std::string("no-slash"), std::string("/"),
                                  std::string("/a/b"), std::string("/.."), std::string("/sp ace"),
                                  "/" + std::string(kMaxSegmentNameLength, 'x')}) {
    const ShmError e = expect_shm_error([&] { Segment::create(name, 4096); }, name);
    EXPECT_EQ(e.kind(), Kind::kSetup) << name;
    EXPECT_NE(std::string(e.what()).find("invalid shared-memory segment name"), std::string::npos)
        << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Channels in one process (setup checks; no waiting)

ChannelOptions local_options(const std::string& prefix, int rank, int size, size_t slot = 256) {
  ChannelOptions o;
  o.name = prefix + "-ch";
  o.rank = rank;
  o.size = size;
  o.slot_bytes = slot;
  o.timeout = milliseconds(1000);
  return o;
}

TEST(ShmChannelSetup, InvalidOptionsNameTheField) {
  const std::string prefix = fresh_prefix();
  struct Case {
    std::function<void(ChannelOptions&)> change;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {[](ChannelOptions& o) { o.name = ""; }, "name must be"},
      {[](ChannelOptions& o) { o.name = "a/b"; }, "name must be"},
      {[](ChannelOptions& o) { o.name = std::string(kMaxChannelNameLength + 1, 'n'); },
       "name must be"},
      {[](ChannelOptions& o) { o.size = 0; }, "size must be in [1, 64], got 0"},
      {[](ChannelOptions& o) { o.size = kMaxRanks + 1; }, "size must be in [1, 64], got 65"},
      {[](ChannelOptions& o) { o.rank = -1; }, "rank must be in [0, size=2), got -1"},
      {[](ChannelOptions& o) { o.rank = 2; }, "rank must be in [0, size=2), got 2"},
      {[](ChannelOptions& o) { o.slot_bytes = 0; }, "slot_bytes must be in [1, "},
      {[](ChannelOptions& o) { o.slot_bytes = kMaxSlotBytes + 1; }, "slot_bytes must be in [1, "},
      {[](ChannelOptions& o) { o.timeout = milliseconds(0); }, "timeout must be > 0"},
      {[](ChannelOptions& o) { o.wait.sleep_min = std::chrono::nanoseconds(0); }, "wait needs"},
  };
  for (const Case& c : cases) {
    ChannelOptions o = local_options(prefix, 0, 2);
    c.change(o);
    const ShmError e = expect_shm_error([&] { Channel::create(o); }, c.expected);
    EXPECT_EQ(e.kind(), Kind::kSetup);
    EXPECT_NE(std::string(e.what()).find(c.expected), std::string::npos) << e.what();
  }
  expect_no_shm_left(prefix);
}

// Both ranks of a 2-rank channel in this process: map, probe, and refusal of foreign peers.
TEST(ShmChannelSetup, MapPeersChecksEveryPeer) {
  const std::string prefix = fresh_prefix();
  {
    auto rank0 = Channel::create(local_options(prefix, 0, 2));
    EXPECT_FALSE(rank0->probe());  // not mapped yet
    // Rank 1 has not created its segment: kSetup about rank 1, nothing of rank 0 leaks.
    const ShmError missing = expect_shm_error(
        [&] { rank0->map_peers({rank0->instance_token(), 12345}); }, "missing peer");
    EXPECT_EQ(missing.kind(), Kind::kSetup);
    EXPECT_EQ(missing.peer(), 1);
    EXPECT_NE(std::string(missing.what()).find("rank 1"), std::string::npos) << missing.what();
    EXPECT_NE(std::string(missing.what()).find("ENOENT"), std::string::npos) << missing.what();
    // Steps before a successful map_peers() are a usage error.
    EXPECT_EQ(expect_shm_error([&] { rank0->begin(fp_of(1)); }, "begin").kind(), Kind::kUsage);
  }
  expect_no_shm_left(prefix);
  {
    auto rank0 = Channel::create(local_options(prefix, 0, 2));
    auto rank1 = Channel::create(local_options(prefix, 1, 2));
    // The instance tokens a c10d all-gather would deliver.
    const std::vector<uint64_t> tokens = {rank0->instance_token(), rank1->instance_token()};
    EXPECT_NE(tokens[0], tokens[1]);
    rank0->map_peers(tokens);
    rank1->map_peers(tokens);
    rank0->map_peers(tokens);  // idempotent
    EXPECT_TRUE(rank0->probe());
    EXPECT_TRUE(rank1->probe());
    EXPECT_TRUE(rank0->probe(tokens));
    EXPECT_TRUE(rank1->probe(tokens));
    EXPECT_FALSE(rank0->probe({tokens[0], tokens[1] + 1}));  // not the rank 1 that reported
    EXPECT_FALSE(rank0->probe({tokens[0]}));                 // wrong count
    rank0->unlink_own();
    rank1->unlink_own();
    rank1->unlink_own();  // idempotent
    EXPECT_TRUE(shm_entries(prefix).empty());
    EXPECT_TRUE(rank0->probe());  // the mappings outlive the names
  }
  {
    // A peer created with another slot size: its segment size differs.
    auto rank0 = Channel::create(local_options(prefix, 0, 2, 256));
    auto rank1 = Channel::create(local_options(prefix, 1, 2, 8192));
    const ShmError e = expect_shm_error(
        [&] { rank0->map_peers({rank0->instance_token(), rank1->instance_token()}); },
        "slot size");
    EXPECT_EQ(e.kind(), Kind::kSetup);
    EXPECT_EQ(e.peer(), 1);
    EXPECT_FALSE(rank0->probe());
  }
  {
    // Same segment size, different group size: the header check refuses it.
    auto rank0 = Channel::create(local_options(prefix, 0, 2));
    auto rank1 = Channel::create(local_options(prefix, 1, 3));
    const ShmError e = expect_shm_error(
        [&] { rank0->map_peers({rank0->instance_token(), rank1->instance_token()}); },
        "group size");
    EXPECT_EQ(e.kind(), Kind::kSetup);
    EXPECT_NE(std::string(e.what()).find("size is 3, expected 2"), std::string::npos) << e.what();
  }
  expect_no_shm_left(prefix);  // destructors unlinked what was never unlinked explicitly
}

// Each rank's segment name ends in its own random instance token: the names another rank's
// would predict ("/<name>-r<r>", what an earlier scheme used) can be claimed by anyone on the
// host without blocking the set-up.
TEST(ShmChannelSetup, SegmentNamesAreRandomPerRank) {
  const std::string prefix = fresh_prefix();
  const std::string base = "/" + local_options(prefix, 0, 2).name;
  {
    Segment claimed0 = Segment::create(base + "-r0", 4096);
    Segment claimed1 = Segment::create(base + "-r1", 4096);
    auto rank0 = Channel::create(local_options(prefix, 0, 2));
    auto rank1 = Channel::create(local_options(prefix, 1, 2));
    const std::vector<uint64_t> tokens = {rank0->instance_token(), rank1->instance_token()};
    for (int r = 0; r < 2; ++r) {
      char hex[17];
      std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(tokens[r]));
      const Channel& ch = r == 0 ? *rank0 : *rank1;
      EXPECT_EQ(ch.segment_name(), base + "-r" + std::to_string(r) + "-" + hex);
    }
    rank0->map_peers(tokens);
    rank1->map_peers(tokens);
    EXPECT_TRUE(rank0->probe(tokens));
    EXPECT_TRUE(rank1->probe(tokens));
    auto again = Channel::create(local_options(prefix, 1, 2));
    EXPECT_NE(again->segment_name(), rank1->segment_name());
    Segment::unlink(base + "-r0");
    Segment::unlink(base + "-r1");
  }
  expect_no_shm_left(prefix);
}

// A process killed between create() and unlink_own() leaves its segment; reclaiming removes it,
// and only it: a live creator's segment and a file without a channel header stay.
TEST(ShmReclaim, RemovesOnlySegmentsOfDeadCreators) {
  const std::string prefix = fresh_prefix();
  std::fflush(stderr);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    try {
      auto ch = Channel::create(local_options(prefix + "-dead", 0, 2));
      ::raise(SIGKILL);
    } catch (...) {
    }
    ::_exit(1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "status " << status;
  const std::vector<std::string> left = shm_entries(prefix);
  ASSERT_EQ(left.size(), 1u) << "the killed creator left no segment";
  {
    auto live = Channel::create(local_options(prefix + "-live", 0, 2));
    Segment junk = Segment::create("/" + prefix + "-junk", layout::kHeaderBytes + 2 * 4096);
    EXPECT_EQ(reclaim_dead_segments(prefix), std::vector<std::string>{"/" + left[0]});
    std::vector<std::string> kept = shm_entries(prefix);
    std::sort(kept.begin(), kept.end());
    ASSERT_EQ(kept.size(), 2u);
    EXPECT_EQ("/" + kept[0], "/" + prefix + "-junk");
    EXPECT_EQ("/" + kept[1], live->segment_name());
    EXPECT_TRUE(reclaim_dead_segments(prefix).empty());  // nothing more to remove
    Segment::unlink("/" + prefix + "-junk");
  }
  expect_no_shm_left(prefix);
}

TEST(ShmChannelSetup, SingleRankStepsAndUsageErrors) {
  const std::string prefix = fresh_prefix();
  auto ch = Channel::create(local_options(prefix, 0, 1, 100));
  ch->unlink_own();
  EXPECT_TRUE(ch->probe());
  for (uint64_t i = 1; i <= 5; ++i) {
    const Channel::Step step = ch->begin(fp_of(i));
    uint8_t* own = ch->slot(0, step);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(own) % 4096, 0u);
    std::memset(own, static_cast<int>(i), 100);
    ch->publish(step);
    ch->wait_all(step);
    EXPECT_EQ(own[99], i);
    ch->finish(step);
  }
  const Channel::Step step = ch->begin(fp_of(6));
  const ShmError early = expect_shm_error([&] { ch->finish(step); }, "finish before publish");
  EXPECT_EQ(early.kind(), Kind::kUsage);
  EXPECT_NE(std::string(early.what()).find("finish(step 6)"), std::string::npos) << early.what();
  // A usage error breaks the channel: every later call is kBroken, quoting the first error.
  EXPECT_TRUE(ch->broken());
  const ShmError later = expect_shm_error([&] { ch->publish(step); }, "after usage");
  EXPECT_EQ(later.kind(), Kind::kBroken);
  EXPECT_NE(std::string(later.what()).find("finish(step 6)"), std::string::npos) << later.what();
  ch.reset();
  expect_no_shm_left(prefix);
}

TEST(ShmChannelSetup, UsageRules) {
  const std::string prefix = fresh_prefix();
  auto expect_usage = [&](const std::function<void(Channel&)>& misuse, const std::string& text) {
    auto ch = Channel::create(local_options(prefix, 0, 1));
    const ShmError e = expect_shm_error([&] { misuse(*ch); }, text);
    EXPECT_EQ(e.kind(), Kind::kUsage) << e.what();
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  };
  expect_usage(
      [](Channel& ch) {
        ch.begin(fp_of(1));
        ch.begin(fp_of(2));
      },
      "begin(step 2) before publish(step 1)");
  expect_usage(
      [](Channel& ch) {
        ch.publish(ch.begin(fp_of(1)));
        ch.publish(ch.begin(fp_of(2)));
        ch.begin(fp_of(3));
      },
      "at most two steps may be in flight");
  expect_usage(
      [](Channel& ch) {
        Channel::Step step = ch.begin(fp_of(1));
        step.fp.call = 99;
        ch.publish(step);
      },
      "altered");
  expect_usage(
      [](Channel& ch) {
        const Channel::Step step = ch.begin(fp_of(1));
        ch.publish(step);
        ch.finish(step);
        ch.slot(0, step);
      },
      "not in flight");
  expect_usage([](Channel& ch) { ch.slot(1, ch.begin(fp_of(1))); }, "slot(rank 1)");
  expect_usage([](Channel& ch) { ch.wait_peer(ch.begin(fp_of(1)), -1); }, "wait_peer(peer -1)");
  expect_no_shm_left(prefix);
}

// ---------------------------------------------------------------------------------------------
// Channels over forked ranks

// Every rank writes a (rank, seq) pattern per step and checks every peer's, through
// random delays, in both the strict and the overlapped (two steps in flight) order.
TEST_P(ShmRanks, ExchangeManySmallSteps) {
  const int tp = GetParam();
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    auto strict = setup(ctx, options_for(ctx, "strict", 64, kSafeTimeout));
    exchange(*strict, 400, 1, 1000 + ctx.rank, false);
    auto overlapped = setup(ctx, options_for(ctx, "overlap", 64, kSafeTimeout));
    exchange(*overlapped, 400, 2, 2000 + ctx.rank, true);
  });
  expect_clean_exit(statuses);
}

TEST_P(ShmRanks, ExchangeLargeAndOddSlots) {
  const int tp = GetParam();
  constexpr size_t kLarge = size_t{8} << 20;
  struct statvfs fs{};
  if (::statvfs("/dev/shm", &fs) == 0 &&
      static_cast<double>(fs.f_bavail) * fs.f_frsize < 4.0 * tp * kLarge) {
    GTEST_SKIP() << "/dev/shm has too little space for " << tp << " x 2 x 8 MiB";
  }
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    auto large = setup(ctx, options_for(ctx, "large", kLarge, kSafeTimeout));
    exchange(*large, 6, 3, 3000 + ctx.rank, true);
    auto odd = setup(ctx, options_for(ctx, "odd", 4104, kSafeTimeout));  // not page-sized
    exchange(*odd, 50, 4, 4000 + ctx.rank, false);
  });
  expect_clean_exit(statuses);
}

// One rank publishes a different fingerprint at step 5: every rank gets kMismatch naming both.
TEST_P(ShmRanks, FingerprintMismatchFailsEveryRank) {
  const int tp = GetParam();
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    auto ch = setup(ctx, options_for(ctx, "mismatch", 64, kSafeTimeout));
    exchange(*ch, 4, 5, ctx.rank, false);
    const bool odd_one = ctx.rank == ctx.size - 1;
    const Channel::Step step = ch->begin(fp_of(odd_one ? 999 : 5, 0, 64));
    ch->publish(step);
    const ShmError e = expect_shm_error([&] { ch->wait_all(step); }, "mismatch");
    require_kind(e, Kind::kMismatch, "wait_all");
    require(e.peer() == (odd_one ? 0 : ctx.size - 1), "wrong peer " + std::to_string(e.peer()));
    require_contains(e.what(), "test-call 5 piece 0", "mismatch");
    require_contains(e.what(), "test-call 999 piece 0", "mismatch");
    require_contains(e.what(), "step 5", "mismatch");
    require_contains(e.what(), "test group 'mismatch'", "mismatch");
    require(ch->broken(), "a mismatch must break the channel");
    require_kind(expect_shm_error([&] { ch->finish(step); }, "after mismatch"), Kind::kBroken,
                 "finish after mismatch");
  });
  expect_clean_exit(statuses);
}

// The last rank never starts step 3: the others time out naming it, within timeout + margin.
// Released afterwards, the late rank finds them aborted.
TEST_P(ShmRanks, AbsentRankTimesOut) {
  const int tp = GetParam();
  constexpr milliseconds kTimeout{300};
  Launch launch = ranks(tp);
  launch.linger_rank = tp - 1;
  const auto statuses = run_ranks(prefix_, launch, [&](RankContext& ctx) {
    auto ch = setup(ctx, options_for(ctx, "absent", 64, kTimeout));
    exchange(*ch, 2, 6, ctx.rank, false);
    const int absent = ctx.size - 1;
    if (ctx.rank == absent) {
      ctx.wait_release();
      // The others published step 3, then failed: step 3 passes, step 4 finds them aborted.
      const Channel::Step three = ch->begin(fp_of(3));
      ch->publish(three);
      ch->wait_all(three);
      ch->finish(three);
      const Channel::Step four = ch->begin(fp_of(4));
      ch->publish(four);
      const ShmError e = expect_shm_error([&] { ch->wait_all(four); }, "late rank");
      require_kind(e, Kind::kPeerAborted, "late rank");
      require_contains(e.what(), "timed out", "late rank");
      return;
    }
    const Channel::Step step = ch->begin(fp_of(3));
    ch->publish(step);
    const Clock::time_point start = Clock::now();
    const ShmError e = expect_shm_error([&] { ch->wait_all(step); }, "absent rank");
    const auto elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    require_kind(e, Kind::kTimeout, "absent rank");
    require(e.peer() == absent, "timeout names peer " + std::to_string(e.peer()));
    require_contains(
        e.what(),
        "waiting for rank " + std::to_string(absent) + " to publish step 3 (it never arrived)",
        "timeout");
    require_contains(e.what(), "rank " + std::to_string(ctx.rank) + " of", "timeout");
    require_contains(e.what(), "test group 'absent'", "timeout");
    require_contains(e.what(), "test-call 3 piece 0", "timeout (ours)");
    require_contains(e.what(), "test-call 2 piece 0", "timeout (the absent rank's last)");
    // The wait may start up to a peer's wait_peer() earlier than `start`; it never ends early
    // by more than that, and the margin bounds a loaded machine's scheduling delay.
    require(elapsed >= kTimeout - milliseconds(50) && elapsed < kTimeout + milliseconds(3000),
            "timed out after " + std::to_string(elapsed.count()) + " ms");
  });
  expect_clean_exit(statuses);
}

// A rank killed (SIGKILL) while the others wait for it: they get kPeerDead long before the
// timeout, both when its parent reaps it at once and when it stays a zombie.
class ShmKilledRank : public ::testing::TestWithParam<std::tuple<int, bool>> {
 protected:
  void SetUp() override { prefix_ = fresh_prefix(); }
  void TearDown() override { expect_no_shm_left(prefix_); }
  std::string prefix_;
};

TEST_P(ShmKilledRank, SurvivorsSeePeerDead) {
  const auto [tp, zombie] = GetParam();
  const int victim = tp / 2;  // 1 of 2, 1 of 3, 2 of 4
  Launch launch = ranks(tp);
  if (zombie) launch.reap_last_rank = victim;
  launch.parent_action = [victim](const std::vector<pid_t>& pids, int signal_fd) {
    ASSERT_TRUE(read_byte(signal_fd, kSafeTimeout)) << "the victim never got ready";
    std::this_thread::sleep_for(milliseconds(100));  // the survivors are in their waits now
    ::kill(pids[victim], SIGKILL);
  };
  const auto statuses = run_ranks(prefix_, launch, [&](RankContext& ctx) {
    auto ch = setup(ctx, options_for(ctx, "killed", 64, kSafeTimeout));
    exchange(*ch, 3, 7, ctx.rank, false);
    if (ctx.rank == victim) {
      ctx.signal_parent();
      ::pause();  // until SIGKILL
      return;
    }
    const Channel::Step step = ch->begin(fp_of(4));
    ch->publish(step);
    const Clock::time_point start = Clock::now();
    const ShmError e = expect_shm_error([&] { ch->wait_all(step); }, "killed rank");
    const auto elapsed = Clock::now() - start;
    require_kind(e, Kind::kPeerDead, "killed rank");
    require(e.peer() == victim, "kPeerDead names peer " + std::to_string(e.peer()));
    require_contains(e.what(), "rank " + std::to_string(victim) + " (pid ", "kPeerDead");
    require_contains(e.what(), "died", "kPeerDead");
    require(elapsed < kSafeTimeout / 2, "kPeerDead came late");
  });
  for (int r = 0; r < tp; ++r) {
    if (r == victim) {
      EXPECT_TRUE(WIFSIGNALED(statuses[r]) && WTERMSIG(statuses[r]) == SIGKILL)
          << "victim status " << statuses[r];
    }
  }
  expect_clean_exit(statuses, victim);
}

// abort() on one rank: peers waiting on it get kPeerAborted quoting the reason; the aborted
// rank's own later calls get kBroken.
TEST_P(ShmRanks, AbortReachesEveryPeer) {
  const int tp = GetParam();
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    auto ch = setup(ctx, options_for(ctx, "abort", 64, kSafeTimeout));
    exchange(*ch, 3, 8, ctx.rank, true);
    const Channel::Step step = ch->begin(fp_of(4));
    if (ctx.rank == 1) {
      ch->abort("caller gave up: reason 42");
      ch->abort("a second reason is ignored");
      require(ch->broken(), "broken() after abort()");
      const ShmError e = expect_shm_error([&] { ch->publish(step); }, "after abort");
      require_kind(e, Kind::kBroken, "after abort");
      require_contains(e.what(), "caller gave up: reason 42", "after abort");
      return;
    }
    ch->publish(step);
    const ShmError e = expect_shm_error([&] { ch->wait_all(step); }, "aborted peer");
    require_kind(e, Kind::kPeerAborted, "aborted peer");
    require(e.peer() == 1, "kPeerAborted names peer " + std::to_string(e.peer()));
    require_contains(e.what(), "caller gave up: reason 42", "kPeerAborted");
  });
  expect_clean_exit(statuses);
}

// A rank that leaves the collective sequence (an exception unwinds through its channel, or it
// simply stops) closes its channel: the others fail fast with kPeerAborted, not a timeout.
TEST_P(ShmRanks, RankThatLeavesEarlyIsReported) {
  const int tp = GetParam();
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    const int leaver = ctx.size - 1;
    if (ctx.rank == leaver) {
      try {
        auto ch = setup(ctx, options_for(ctx, "leave", 64, kSafeTimeout));
        exchange(*ch, 5, 9, ctx.rank, false);
        throw std::runtime_error("model code failed");
      } catch (const std::runtime_error& e) {
        require(std::string(e.what()) == "model code failed", "unexpected exception");
      }
      return;
    }
    auto ch = setup(ctx, options_for(ctx, "leave", 64, kSafeTimeout));
    exchange(*ch, 5, 9, ctx.rank, false);
    const Channel::Step step = ch->begin(fp_of(6));
    ch->publish(step);
    const ShmError e = expect_shm_error([&] { ch->wait_all(step); }, "left rank");
    require_kind(e, Kind::kPeerAborted, "left rank");
    require(e.peer() == leaver, "names peer " + std::to_string(e.peer()));
    require_contains(e.what(), "closed its channel after finishing step 5", "left rank");
  });
  expect_clean_exit(statuses);
}

// An exception after map_peers() but before unlink_own() on one rank: its Channel's destructor
// unlinks its segment, and the others, once they step, find its channel closed.
TEST_P(ShmRanks, ExceptionDuringSetupLeavesNothing) {
  const int tp = GetParam();
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    const ChannelOptions options = options_for(ctx, "setup", 64, kSafeTimeout);
    if (ctx.rank == 0) {
      try {
        auto ch = Channel::create(options);
        ch->map_peers(ctx.all_gather(ch->instance_token()));
        ctx.sync();  // every rank has mapped every segment
        throw std::runtime_error("setup failed");
      } catch (const std::runtime_error& e) {
        require(std::string(e.what()) == "setup failed", "unexpected exception");
      }
      return;
    }
    auto ch = setup(ctx, options);
    const Channel::Step step = ch->begin(fp_of(1));
    ch->publish(step);
    const ShmError e = expect_shm_error([&] { ch->wait_all(step); }, "closed during setup");
    require_kind(e, Kind::kPeerAborted, "closed during setup");
    require(e.peer() == 0, "names peer " + std::to_string(e.peer()));
    require_contains(e.what(), "closed its channel after finishing step 0", "closed in setup");
  });
  expect_clean_exit(statuses);
}

// abort() from another thread (a watchdog) ends this rank's wait with kBroken; the waited-for
// rank, arriving later, finds this one aborted.
TEST_P(ShmRanks, AbortFromAnotherThreadEndsTheWait) {
  const int tp = GetParam();
  Launch launch = ranks(tp);
  launch.linger_rank = tp - 1;
  const auto statuses = run_ranks(prefix_, launch, [](RankContext& ctx) {
    auto ch = setup(ctx, options_for(ctx, "watchdog", 64, kSafeTimeout));
    exchange(*ch, 2, 12, ctx.rank, false);
    const int late = ctx.size - 1;
    if (ctx.rank == late) {
      ctx.wait_release();
      // The others published step 3 before their watchdogs fired: step 3 passes, step 4 fails.
      const Channel::Step three = ch->begin(fp_of(3));
      ch->publish(three);
      ch->wait_all(three);
      ch->finish(three);
      const Channel::Step four = ch->begin(fp_of(4));
      ch->publish(four);
      const ShmError e = expect_shm_error([&] { ch->wait_all(four); }, "late rank");
      require_kind(e, Kind::kPeerAborted, "late rank");
      require(e.peer() == 0, "names peer " + std::to_string(e.peer()));
      return;
    }
    const Channel::Step step = ch->begin(fp_of(3));
    ch->publish(step);
    std::thread watchdog([&ch] {
      std::this_thread::sleep_for(milliseconds(50));
      ch->abort("watchdog: step 3 takes too long");
    });
    const ShmError e = expect_shm_error([&] { ch->wait_all(step); }, "watchdog");
    watchdog.join();
    require_kind(e, Kind::kBroken, "watchdog");
    require_contains(e.what(), "watchdog: step 3 takes too long", "watchdog");
  });
  expect_clean_exit(statuses);
}

// Two channels of the same ranks, used alternately in random order, never see each other's
// data or counters.
TEST_P(ShmRanks, TwoChannelsDoNotInterfere) {
  const int tp = GetParam();
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    auto a = setup(ctx, options_for(ctx, "a", 64, kSafeTimeout));
    auto b = setup(ctx, options_for(ctx, "b", 4096, kSafeTimeout));
    std::mt19937_64 rng(5000 + ctx.rank);
    for (uint64_t i = 1; i <= 200; ++i) {
      // Every publish of a round precedes its waits, so no order of the two can deadlock.
      std::vector<std::pair<Channel*, int>> order = {{a.get(), 10}, {b.get(), 11}};
      std::shuffle(order.begin(), order.end(), rng);
      std::vector<std::pair<Channel::Step, std::pair<Channel*, int>>> open;
      for (const auto& [ch, tag] : order) {
        const Channel::Step step = ch->begin(fp_of(i, 0, ch->slot_bytes()));
        fill(ch->slot(ctx.rank, step), ch->slot_bytes(), tag, ctx.rank, step.seq);
        ch->publish(step);
        open.push_back({step, {ch, tag}});
        random_delay(rng);
      }
      std::shuffle(open.begin(), open.end(), rng);
      for (const auto& [step, channel] : open) {
        const auto& [ch, tag] = channel;
        ch->wait_all(step);
        check_all(*ch, step, tag);
        ch->finish(step);
        random_delay(rng);
      }
    }
  });
  expect_clean_exit(statuses);
}

// A rank forks after set-up; the child tries a step, aborts and destroys its copy of the
// channel, as a child's exit() would. None of it reaches the shared memory: the child gets
// kForked, and the parent's channel goes on with every peer.
TEST_P(ShmRanks, ForkedChildNeverTouchesTheParentsChannel) {
  const int tp = GetParam();
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    auto ch = setup(ctx, options_for(ctx, "fork", 64, kSafeTimeout));
    exchange(*ch, 3, 12, ctx.rank, false);
    if (ctx.rank == 0) {
      std::fflush(stderr);
      const pid_t child = ::fork();
      require(child >= 0, "fork failed");
      if (child == 0) {
        int status = 0;
        try {
          require(ch->foreign(), "foreign() is false in the child");
          const ShmError e = expect_shm_error([&] { ch->begin(fp_of(4)); }, "step in a child");
          require_kind(e, Kind::kForked, "step in a child");
          require_contains(e.what(), "a forked child cannot use its parent's", "kForked");
          ch->abort("the child gives up");  // must not reach the parent's header
          ch.reset();                        // nor may the destructor's close
        } catch (const std::exception& e) {
          std::fprintf(stderr, "[forked child] FAILED: %s\n", e.what());
          status = 1;
        }
        std::fflush(stderr);
        ::_exit(status);
      }
      int status = 0;
      require(::waitpid(child, &status, 0) == child, "waitpid");
      require(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the forked child failed");
      require(!ch->foreign() && !ch->broken(), "the parent's channel changed");
    }
    for (uint64_t call = 4; call <= 7; ++call) exchange_one(*ch, call, 12);  // child gone
  });
  expect_clean_exit(statuses);
}

// A timeout past the steady clock's range (a group timeout of timedelta.max) never expires,
// instead of overflowing into a deadline in the past that fails the first wait.
TEST_P(ShmRanks, TimeoutBeyondTheClocksRangeSaturates) {
  const int tp = GetParam();
  const auto statuses = run_ranks(prefix_, ranks(tp), [](RankContext& ctx) {
    auto ch = setup(ctx, options_for(ctx, "forever", 64, milliseconds::max()));
    for (uint64_t call = 1; call <= 2; ++call) {
      // Rank 0 reaches every wait first, so its waits really wait.
      if (ctx.rank != 0) std::this_thread::sleep_for(milliseconds(100));
      exchange_one(*ch, call, 13);
    }
  });
  expect_clean_exit(statuses);
}

INSTANTIATE_TEST_SUITE_P(Tp, ShmRanks, ::testing::Values(2, 3, 4),
                         [](const auto& info) { return "tp" + std::to_string(info.param); });
INSTANTIATE_TEST_SUITE_P(Tp, ShmKilledRank,
                         ::testing::Combine(::testing::Values(2, 3, 4), ::testing::Bool()),
                         [](const auto& info) {
                           return "tp" + std::to_string(std::get<0>(info.param)) +
                                  (std::get<1>(info.param) ? "_zombie" : "_reaped");
                         });

// ---------------------------------------------------------------------------------------------
// Ping-pong latency (printed, never asserted: timings belong in benchmarks)

double cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
         1e-6 * (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

TEST(ShmPingPong, PrintsMicrosecondsPerStep) {
  const std::string prefix = fresh_prefix();
  struct Variant {
    const char* name;
    WaitPolicy policy;
    int steps;
    int late_us;  // rank 1 sleeps this long before each publish
  };
  WaitPolicy no_spin;
  no_spin.spin = std::chrono::nanoseconds(0);
  WaitPolicy long_spin;
  long_spin.spin = long_spin.yield = std::chrono::microseconds(50);
  WaitPolicy sleep_only;
  sleep_only.spin = sleep_only.yield = std::chrono::nanoseconds(0);
  const std::vector<Variant> variants = {
      {"default policy, peer on time", WaitPolicy{}, 20000, 0},
      {"no spin (yield, then sleep), peer on time", no_spin, 20000, 0},
      {"spin 50 us, then sleep, peer on time", long_spin, 5000, 0},
      {"sleep only, peer on time", sleep_only, 2000, 0},
      {"default policy, peer 2 ms late", WaitPolicy{}, 200, 2000},
  };
  int index = 0;
  for (const Variant& v : variants) {
    const auto statuses = run_ranks(prefix, ranks(2), [&](RankContext& ctx) {
      ChannelOptions o = options_for(ctx, "pp" + std::to_string(index), 64, kSafeTimeout);
      o.wait = v.policy;
      auto ch = setup(ctx, o);
      const double cpu0 = cpu_seconds();
      const Clock::time_point start = Clock::now();
      for (int i = 1; i <= v.steps; ++i) {
        const Channel::Step step = ch->begin(fp_of(i));
        *reinterpret_cast<uint64_t*>(ch->slot(ctx.rank, step)) = i;
        if (ctx.rank == 1 && v.late_us > 0) ::usleep(v.late_us);
        ch->publish(step);
        ch->wait_all(step);
        require(*reinterpret_cast<const uint64_t*>(ch->slot(1 - ctx.rank, step)) ==
                    static_cast<uint64_t>(i),
                "ping-pong data");
        ch->finish(step);
      }
      const double wall = std::chrono::duration<double>(Clock::now() - start).count();
      const double cpu = cpu_seconds() - cpu0;
      if (ctx.rank == 0) {
        std::printf("[ping-pong tp=2] %-45s %8.2f us/step, waiter CPU %5.1f%% (%d steps)\n", v.name,
                    1e6 * wall / v.steps, 100.0 * cpu / wall, v.steps);
      }
    });
    expect_clean_exit(statuses);
    ++index;
  }
  expect_no_shm_left(prefix);
}

}  // namespace
