// One POSIX shared-memory object mapped into this process. Torch-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "core/shm/error.h"

namespace flashcomm::core::shm {

// Longest segment name accepted, leading '/' included (NAME_MAX of /dev/shm is 255).
inline constexpr size_t kMaxSegmentNameLength = 250;

// Throws ShmError(kSetup) unless `name` is a valid POSIX shared-memory name for this layer:
// a leading '/', then 1..kMaxSegmentNameLength-1 characters of [A-Za-z0-9._-] (so no further
// '/', no "." or ".." tricks and nothing a shell or log needs to quote).
void check_segment_name(const std::string& name);

// A mapping of one shared-memory object, move-only. The destructor unmaps; it never unlinks
// (the name is unlinked explicitly, as early as possible, by whoever created it).
class Segment {
 public:
  enum class Access { kReadOnly, kReadWrite };

  // Creates `name` (shm_open O_CREAT|O_EXCL|O_RDWR, mode 0600) with `bytes` bytes reserved
  // in full (posix_fallocate, so a full /dev/shm fails here and not later with SIGBUS) and
  // maps it read-write with every page populated; the contents are zero. Any failure
  // (EEXIST, ENOSPC on a full /dev/shm, EMFILE, ...) throws ShmError(kSetup) naming the
  // segment, its size and the errno text, after removing whatever this call made. With
  // `name_taken`, an existing name is not an error: *name_taken = true and an empty Segment.
  static Segment create(const std::string& name, size_t bytes, bool* name_taken = nullptr);

  // Maps the existing object `name`, whose size must be exactly `bytes` (ShmError(kSetup)
  // otherwise, as for every failure). A kReadOnly mapping faults on any store.
  static Segment open(const std::string& name, size_t bytes, Access access = Access::kReadWrite);

  // Removes the name from /dev/shm; mappings stay valid. A missing name is not an error.
  static void unlink(const std::string& name) noexcept;

  Segment() = default;
  Segment(Segment&& other) noexcept;
  Segment& operator=(Segment&& other) noexcept;
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  ~Segment();

  // Page-aligned start of the mapping (nullptr for a default-constructed Segment).
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  bool writable() const { return writable_; }

 private:
  Segment(std::string name, uint8_t* data, size_t size, bool writable)
      : name_(std::move(name)), data_(data), size_(size), writable_(writable) {}
  void reset() noexcept;

  std::string name_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool writable_ = false;
};

}  // namespace flashcomm::core::shm
