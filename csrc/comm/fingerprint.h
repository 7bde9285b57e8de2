// The fingerprint of one collective: what the ranks compare so that a rank that
// took another path (another token count, mode or strategy) is reported by name
// on every rank instead of hanging in, or reading garbage from, a mismatched
// collective. Used by the shared-memory transport on every collective (its slot
// headers carry it) and by the c10d transport under FLASHCOMM_DEBUG_CHECK=1.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "comm/transport.h"

namespace flashcomm::comm {

struct Fingerprint {
  Collective kind = Collective::kAllReduce;
  int64_t dtype = -1;   // c10::ScalarType
  int64_t bytes = 0;    // this rank's contribution to the collective
  int64_t call = 0;     // collectives issued on the group so far (same on every rank)
  int64_t op = 0;       // stable hash of CallInfo::op
  int64_t n = -1;       // CallInfo::n
  int64_t mode = -1;    // CallInfo::mode
  int64_t strategy = -1;

  static constexpr int kWords = 8;
  std::vector<int64_t> to_words() const;
  static Fingerprint from_words(const int64_t* words);
  bool operator==(const Fingerprint& o) const;
  bool operator!=(const Fingerprint& o) const { return !(*this == o); }
  // e.g. "reduce_scatter of 4096 bytes of float32 (collective #7; op sp_row_linear,
  // n=1001, mode sharded, strategy sequential)"
  std::string describe() const;
};

Fingerprint make_fingerprint(Collective kind, c10::ScalarType dtype, int64_t bytes,
                             const CallInfo& call, uint64_t seq);
inline Fingerprint make_fingerprint(Collective kind, const at::Tensor& t, const CallInfo& call,
                                    uint64_t seq) {
  return make_fingerprint(kind, t.scalar_type(), t.numel() * t.element_size(), call, seq);
}

// "" when every rank's fingerprint is the same, else "rank 0: ...; rank 1: ..."
// listing each rank's collective.
std::string describe_fingerprint_mismatch(const std::vector<Fingerprint>& by_rank);

}  // namespace flashcomm::comm
