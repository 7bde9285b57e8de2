#include "comm/fingerprint.h"

#include <map>
#include <mutex>
#include <sstream>

#include "core/agreement.h"
#include "core/policy.h"

namespace flashcomm::comm {

namespace {

// Op names seen in this process, by hash, so a peer's op can be named.
std::mutex g_names_mu;
std::map<int64_t, std::string>& op_names() {
  static std::map<int64_t, std::string> names;
  return names;
}

int64_t op_code(const char* op) {
  const std::string name = op != nullptr ? op : "";
  const int64_t code = core::stable_hash(name);
  std::lock_guard<std::mutex> lock(g_names_mu);
  op_names().emplace(code, name);
  return code;
}

std::string op_label(int64_t code) {
  std::lock_guard<std::mutex> lock(g_names_mu);
  auto it = op_names().find(code);
  if (it != op_names().end()) return it->second;
  std::ostringstream s;
  s << "op#" << code;
  return s.str();
}

}  // namespace

const char* collective_name(Collective kind) {
  switch (kind) {
    case Collective::kAllReduce:
      return "all_reduce";
    case Collective::kReduceScatter:
      return "reduce_scatter";
    case Collective::kAllGather:
      return "all_gather";
  }
  return "collective";
}

std::vector<int64_t> Fingerprint::to_words() const {
  return {static_cast<int64_t>(kind), dtype, bytes, call, op, n, mode, strategy};
}

Fingerprint Fingerprint::from_words(const int64_t* w) {
  Fingerprint f;
  f.kind = static_cast<Collective>(w[0]);
  f.dtype = w[1];
  f.bytes = w[2];
  f.call = w[3];
  f.op = w[4];
  f.n = w[5];
  f.mode = w[6];
  f.strategy = w[7];
  return f;
}

bool Fingerprint::operator==(const Fingerprint& o) const { return to_words() == o.to_words(); }

std::string Fingerprint::describe() const {
  std::ostringstream s;
  s << collective_name(kind) << " of " << bytes << " bytes";
  if (dtype >= 0 && dtype < static_cast<int64_t>(c10::ScalarType::NumOptions)) {
    s << " of " << c10::toString(static_cast<c10::ScalarType>(dtype));
  }
  s << " (collective #" << call << "; op " << op_label(op);
  if (n >= 0) s << ", n=" << n;
  if (mode >= 0) s << ", mode " << core::mode_name(static_cast<core::Mode>(mode));
  if (strategy >= 0) s << ", strategy " << core::strategy_name(static_cast<core::Strategy>(strategy));
  s << ")";
  return s.str();
}

Fingerprint make_fingerprint(Collective kind, c10::ScalarType dtype, int64_t bytes,
                             const CallInfo& call, uint64_t seq) {
  Fingerprint f;
  f.kind = kind;
  f.dtype = static_cast<int64_t>(dtype);
  f.bytes = bytes;
  f.call = static_cast<int64_t>(seq);
  f.op = op_code(call.op);
  f.n = call.n;
  f.mode = call.mode;
  f.strategy = call.strategy;
  return f;
}

std::string describe_fingerprint_mismatch(const std::vector<Fingerprint>& by_rank) {
  bool same = true;
  for (const Fingerprint& f : by_rank) same = same && f == by_rank.front();
  if (same) return "";
  std::ostringstream s;
  for (size_t r = 0; r < by_rank.size(); ++r) {
    s << (r ? "; " : "") << "rank " << r << ": " << by_rank[r].describe();
  }
  return s.str();
}

}  // namespace flashcomm::comm
