#include "core/shm/sys.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <system_error>

namespace flashcomm::core::shm {
namespace {

const char* errno_name(int err) {
  switch (err) {
    case EEXIST:
      return "EEXIST";
    case ENOENT:
      return "ENOENT";
    case ENOSPC:
      return "ENOSPC";
    case ENOMEM:
      return "ENOMEM";
    case EMFILE:
      return "EMFILE";
    case ENFILE:
      return "ENFILE";
    case EACCES:
      return "EACCES";
    case EPERM:
      return "EPERM";
    case EINVAL:
      return "EINVAL";
    case EFBIG:
      return "EFBIG";
    case ENAMETOOLONG:
      return "ENAMETOOLONG";
    case ENOSYS:
      return "ENOSYS";
    default:
      return nullptr;
  }
}

// State letter and start time of /proc/<pid>/stat; false when it cannot be read or parsed.
// The command name (field 2) is in parentheses and may itself contain ')' or spaces, so
// fields are counted from the last ')'.
bool read_proc_stat(int64_t pid, char* state, uint64_t* start_time, int64_t* stat_pid) {
  std::ifstream file("/proc/" + (pid == 0 ? std::string("self") : std::to_string(pid)) + "/stat");
  std::string text;
  if (!std::getline(file, text)) return false;
  const size_t close = text.rfind(')');
  if (close == std::string::npos) return false;
  *stat_pid = std::strtoll(text.c_str(), nullptr, 10);
  std::istringstream rest(text.substr(close + 1));
  std::string field;
  // Fields 3 (state) .. 22 (starttime).
  for (int index = 3; index <= 22; ++index) {
    if (!(rest >> field)) return false;
    if (index == 3) *state = field[0];
  }
  *start_time = std::strtoull(field.c_str(), nullptr, 10);
  return true;
}

std::atomic<int64_t> g_pid{0};

void refresh_pid() { g_pid.store(::getpid(), std::memory_order_relaxed); }

}  // namespace

int64_t this_pid() {
  static const bool registered = [] {
    refresh_pid();
    ::pthread_atfork(nullptr, nullptr, refresh_pid);
    return true;
  }();
  (void)registered;
  return g_pid.load(std::memory_order_relaxed);
}

std::string errno_text(int err) {
  const std::string text = std::generic_category().message(err);
  const char* name = errno_name(err);
  return name != nullptr ? std::string(name) + ": " + text
                         : "errno " + std::to_string(err) + ": " + text;
}

ProcessId current_process() {
  ProcessId self;
  self.pid = ::getpid();
  char link[64] = {};
  const ssize_t n = ::readlink("/proc/self/ns/pid", link, sizeof(link) - 1);
  // "pid:[4026531836]"
  if (n > 5) self.pid_ns = std::strtoull(link + 5, nullptr, 10);
  char state = 0;
  int64_t stat_pid = 0;
  uint64_t start_time = 0;
  // /proc must show this process under its own pid, or it belongs to another namespace and
  // nothing read there about other pids can be trusted.
  if (read_proc_stat(0, &state, &start_time, &stat_pid) && stat_pid == self.pid) {
    self.start_time = start_time;
  } else {
    self.pid_ns = 0;
  }
  return self;
}

Liveness process_liveness(const ProcessId& who) {
  if (who.pid <= 0) return Liveness::kAlive;
  if (::kill(static_cast<pid_t>(who.pid), 0) == -1 && errno == ESRCH) return Liveness::kGone;
  char state = 0;
  uint64_t start_time = 0;
  int64_t stat_pid = 0;
  if (!read_proc_stat(who.pid, &state, &start_time, &stat_pid)) {
    // Gone between the two checks, or /proc unreadable: decide on kill() alone.
    return ::kill(static_cast<pid_t>(who.pid), 0) == -1 && errno == ESRCH ? Liveness::kGone
                                                                          : Liveness::kAlive;
  }
  if (state == 'Z' || state == 'X') return Liveness::kGone;
  if (who.start_time != 0 && start_time != who.start_time) return Liveness::kGone;
  return Liveness::kAlive;
}

}  // namespace flashcomm::core::shm
