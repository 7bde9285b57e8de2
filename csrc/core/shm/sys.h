// Operating-system helpers of the shared-memory protocol: errno text, process identity and
// liveness, the spin-wait pause. Torch-free; Linux.
#pragma once

#include <cstdint>
#include <string>

namespace flashcomm::core::shm {

// "EEXIST: File exists" (symbolic name where known, then the system's text).
std::string errno_text(int err);

// What identifies a process across its lifetime, as seen from its own pid namespace.
struct ProcessId {
  int64_t pid = 0;
  uint64_t pid_ns = 0;      // inode of /proc/self/ns/pid; 0 when unknown (then never compared)
  uint64_t start_time = 0;  // field 22 of /proc/<pid>/stat (clock ticks after boot); 0 if unknown
};

// The calling process (read afresh on every call, so it is right after a fork()).
ProcessId current_process();

// getpid() of the calling process at the cost of a load: cached, and refreshed in a child by a
// pthread_atfork handler (registered at the first call), so it is right after any fork() made
// through the C library (os.fork(), multiprocessing's fork).
int64_t this_pid();

enum class Liveness { kAlive, kGone };

// Whether `who` still runs. Only meaningful when who.pid_ns equals the caller's pid_ns (and is
// non-zero): pids of another namespace say nothing here. kGone when the pid does not exist
// (ESRCH), is a zombie (killed but not yet reaped by its parent), or now belongs to a process
// started at another time (pid reuse). Anything unclear (EPERM, no /proc) counts as kAlive, so
// a wrong answer can only delay an error to the timeout, never invent one.
Liveness process_liveness(const ProcessId& who);

// One pause of a spin-wait loop (x86 `pause`, ARM `yield`; nothing elsewhere).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace flashcomm::core::shm
