// Byte layout of one rank's channel segment (internal to csrc/core/shm; see channel.h for the
// protocol). Every rank of a job runs the same build, but the layout is still versioned so a
// segment of another build is refused at map_peers() instead of misread.
//
//   [0, kHeaderBytes)                       SegmentHeader (below)
//   [kHeaderBytes, +slot_stride)            buffer 0 (steps with even seq)
//   [kHeaderBytes + slot_stride, +stride)   buffer 1 (steps with odd seq)
//
// slot_stride = slot_bytes rounded up to kSlotAlign, so both buffers start page-aligned.
// Only the owner rank ever stores into its segment; peers map it read-only.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace flashcomm::core::shm::layout {

inline constexpr uint64_t kMagic = 0x314d48534d4f4346ULL;  // "FCOMSHM1", little-endian
inline constexpr uint32_t kVersion = 1;
inline constexpr size_t kCacheLine = 64;
inline constexpr size_t kHeaderBytes = 4096;
inline constexpr size_t kSlotAlign = 4096;
inline constexpr size_t kReasonBytes = 256;

// Values of SegmentHeader::state. kAborting is transient: the reason text is being written;
// kAborted and kClosed are final and release-publish `reason`.
inline constexpr uint64_t kStateOpen = 0;
inline constexpr uint64_t kStateAborting = 1;
inline constexpr uint64_t kStateAborted = 2;  // abort(why): reason = why
inline constexpr uint64_t kStateClosed = 3;   // the owner destroyed its Channel

// Written once by the owner in Channel::create() before anyone else maps the segment; `magic`
// is stored last (release), so a reader that loads kMagic (acquire) sees every other field.
struct alignas(kCacheLine) Identity {
  std::atomic<uint64_t> magic;
  uint32_t version;
  uint32_t rank;
  uint32_t size;
  uint32_t reserved;
  uint64_t slot_bytes;
  uint64_t slot_stride;
  uint64_t token;       // channel_token(name, size, slot_bytes): the same on every rank
  uint64_t instance;    // random per Channel::create(): Channel::instance_token()
  uint64_t pid;         // owner's pid in its pid namespace
  uint64_t pid_ns;      // owner's pid-namespace inode (0: unknown)
  uint64_t start_time;  // owner's start time (0: unknown), to tell pid reuse from life
};

// One counter alone in its cache line: the owner stores, peers poll.
struct alignas(kCacheLine) Counter {
  std::atomic<uint64_t> value;
};

// The fingerprint of the step last published from one buffer. Fields are relaxed atomics: they
// are ordered by the release store of `published` that follows them, and being atomic keeps a
// diagnostic read of a record that is being rewritten free of data races.
struct alignas(kCacheLine) FingerprintRecord {
  std::atomic<uint64_t> seq;
  std::atomic<uint64_t> kind_dtype;  // kind << 32 | dtype
  std::atomic<uint64_t> bytes;
  std::atomic<uint64_t> call;
  std::atomic<uint64_t> piece;
  std::atomic<uint64_t> tag[2];
};

struct SegmentHeader {
  Identity identity;
  Counter published;                  // last seq whose buffer contents and fingerprint are complete
  Counter finished;                   // last seq of which the owner has read everything it needs
  Counter state;                      // kState*
  FingerprintRecord fingerprints[2];  // [seq % 2]
  char reason[kReasonBytes];          // NUL-terminated; valid once state is final
};

static_assert(std::atomic<uint64_t>::is_always_lock_free,
              "shared-memory counters need lock-free 64-bit atomics (no locks across processes)");
static_assert(sizeof(std::atomic<uint64_t>) == sizeof(uint64_t));
static_assert(sizeof(Identity) == 2 * kCacheLine && sizeof(Counter) == kCacheLine);
static_assert(sizeof(FingerprintRecord) == kCacheLine);
static_assert(offsetof(SegmentHeader, published) == 2 * kCacheLine);
static_assert(offsetof(SegmentHeader, finished) == 3 * kCacheLine);
static_assert(offsetof(SegmentHeader, state) == 4 * kCacheLine);
static_assert(offsetof(SegmentHeader, fingerprints) == 5 * kCacheLine);
static_assert(offsetof(SegmentHeader, reason) == 7 * kCacheLine);
static_assert(sizeof(SegmentHeader) <= kHeaderBytes);
static_assert(kHeaderBytes % kSlotAlign == 0 && kSlotAlign % kCacheLine == 0);

}  // namespace flashcomm::core::shm::layout
