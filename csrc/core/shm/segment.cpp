#include "core/shm/segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <limits>
#include <system_error>

#include "core/shm/sys.h"

namespace flashcomm::core::shm {
namespace {

bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

// What to do about the common failures, appended to the errno text.
std::string hint(int err) {
  switch (err) {
    case EEXIST:
      return " (the name is taken: reused within a job, or left by a crashed one; remove it "
             "from /dev/shm if it is stale)";
    case ENOSPC:
    case ENOMEM:
      return " (is /dev/shm full or too small? see `df -h /dev/shm`; containers: --shm-size)";
    case EMFILE:
    case ENFILE:
      return " (too many open files)";
    default:
      return "";
  }
}

ShmError setup_error(const std::string& what, const std::string& name, size_t bytes,
                     const std::string& call, int err) {
  return ShmError(ShmError::Kind::kSetup, -1,
                  "cannot " + what + " shared-memory segment '" + name + "' of " +
                      std::to_string(bytes) + " bytes: " + call + " failed: " + errno_text(err) +
                      hint(err));
}

}  // namespace

void check_segment_name(const std::string& name) {
  bool ok = name.size() >= 2 && name.size() <= kMaxSegmentNameLength && name[0] == '/' &&
            name != "/." && name != "/..";
  for (size_t i = 1; ok && i < name.size(); ++i) ok = is_name_char(name[i]);
  if (!ok) {
    throw ShmError(ShmError::Kind::kSetup, -1,
                   "invalid shared-memory segment name '" + name + "': expected '/' followed by " +
                       "1 to " + std::to_string(kMaxSegmentNameLength - 1) +
                       " characters of [A-Za-z0-9._-]");
  }
}

Segment Segment::create(const std::string& name, size_t bytes, bool* name_taken) {
  if (name_taken != nullptr) *name_taken = false;
  check_segment_name(name);
  if (bytes == 0 || bytes > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
    throw ShmError(ShmError::Kind::kSetup, -1,
                   "cannot create shared-memory segment '" + name + "' of " +
                       std::to_string(bytes) + " bytes: the size must be in [1, " +
                       std::to_string(std::numeric_limits<off_t>::max()) + "]");
  }
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0 && errno == EEXIST && name_taken != nullptr) {
    *name_taken = true;
    return Segment();
  }
  if (fd < 0) throw setup_error("create", name, bytes, "shm_open(O_CREAT|O_EXCL)", errno);
  // From here on the name exists: every failure removes it again.
  auto undo = [&](const std::string& call, int err) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    return setup_error("create", name, bytes, call, err);
  };
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) throw undo("ftruncate", errno);
  // Reserves every page now: on a full tmpfs this fails with ENOSPC instead of a SIGBUS at
  // the first store into an unbacked page.
  if (const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); err != 0) {
    throw undo("posix_fallocate", err);
  }
  void* addr = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (addr == MAP_FAILED) throw undo("mmap", errno);
  ::close(fd);
  return Segment(name, static_cast<uint8_t*>(addr), bytes, true);
}

Segment Segment::open(const std::string& name, size_t bytes, Access access) {
  check_segment_name(name);
  const bool writable = access == Access::kReadWrite;
  const int fd = shm_open(name.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC, 0);
  if (fd < 0) throw setup_error("open", name, bytes, "shm_open", errno);
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw setup_error("open", name, bytes, "fstat", err);
  }
  if (static_cast<uint64_t>(st.st_size) != bytes) {
    ::close(fd);
    throw ShmError(ShmError::Kind::kSetup, -1,
                   "cannot open shared-memory segment '" + name + "': it has " +
                       std::to_string(st.st_size) + " bytes, expected " + std::to_string(bytes) +
                       " (created by another build or with other options?)");
  }
  const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  void* addr = ::mmap(nullptr, bytes, prot, MAP_SHARED | MAP_POPULATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (addr == MAP_FAILED) throw setup_error("open", name, bytes, "mmap", err);
  return Segment(name, static_cast<uint8_t*>(addr), bytes, writable);
}

void Segment::unlink(const std::string& name) noexcept { ::shm_unlink(name.c_str()); }

Segment::Segment(Segment&& other) noexcept
    : name_(std::move(other.name_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      writable_(std::exchange(other.writable_, false)) {}

Segment& Segment::operator=(Segment&& other) noexcept {
  if (this != &other) {
    reset();
    name_ = std::move(other.name_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    writable_ = std::exchange(other.writable_, false);
  }
  return *this;
}

Segment::~Segment() { reset(); }

void Segment::reset() noexcept {
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace flashcomm::core::shm
