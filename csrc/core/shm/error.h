// The one exception type of the shared-memory protocol (csrc/core/shm). Torch-free.
#pragma once

#include <stdexcept>
#include <string>

namespace flashcomm::core::shm {

// Every failure of this layer. what() always starts with "flashcomm shm: " and names the
// channel label, this rank and, where one is involved, the peer.
class ShmError : public std::runtime_error {
 public:
  enum class Kind {
    kSetup,        // creating/opening/mapping a segment or invalid options; nothing is left behind
    kTimeout,      // a bounded wait expired (peer() never arrived)
    kPeerDead,     // peer()'s process no longer exists
    kMismatch,     // peer() published a different fingerprint for the same step
    kPeerAborted,  // peer() aborted (reason in the message) or closed its channel
    kBroken,       // this channel was aborted earlier; no further step is possible
    kUsage,        // the caller broke the step protocol (order of begin/publish/finish)
    kForked,       // used in a process forked from the one that created the channel
  };

  ShmError(Kind kind, int peer, const std::string& message)
      : std::runtime_error("flashcomm shm: " + message), kind_(kind), peer_(peer) {}

  Kind kind() const { return kind_; }
  // The peer rank the failure is about; -1 when it is not about one peer.
  int peer() const { return peer_; }

 private:
  Kind kind_;
  int peer_;
};

// "setup", "timeout", "peer-dead", "mismatch", "peer-aborted", "broken", "usage", "forked".
const char* kind_name(ShmError::Kind kind);

}  // namespace flashcomm::core::shm
