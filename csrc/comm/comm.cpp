#include "comm/comm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Logging.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include "comm/c10d_compat.h"
#include "comm/c10d_transport.h"
#include "comm/shm_transport.h"
#include "core/settings.h"

namespace flashcomm::comm {

namespace {

using AllReduceFn = at::Tensor(const at::Tensor&, c10::string_view);

struct AllReduceProvider {
  c10::TypedOperatorHandle<AllReduceFn> handle;
  std::string op_name;
  std::string provider_group;
};

bool env_flag(const char* name) {
  try {
    return core::settings::env_bool(name, false);
  } catch (const core::settings::SettingError& e) {
    TORCH_CHECK(false, e.what());
  }
}

TransportKind env_transport() {
  const std::optional<std::string> v = core::settings::raw("FLASHCOMM_TRANSPORT");
  if (!v) return TransportKind::kAuto;
  return parse_transport_kind(core::settings::lower(*v), "FLASHCOMM_TRANSPORT");
}

std::atomic<bool> g_capturing_for_testing{false};

// True while the current stream of `device` records a CUDA graph (or the test hook
// says so). Backends without a notion of capture are never capturing.
bool stream_is_capturing(const at::Device& device) {
  if (g_capturing_for_testing.load(std::memory_order_relaxed)) return true;
  if (device.is_cpu() || device.is_meta()) return false;
  try {
    const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
    return compat::stream_is_capturing(impl->getStream(device));
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

// Per c10d group name. `ready` is the hot-path flag; everything else is written
// under `mu` during setup (collective, so every rank sets the same values).
struct GroupState {
  std::mutex mu;
  std::atomic<bool> ready{false};
  const void* pg_identity = nullptr;  // the ProcessGroup this state belongs to
  TransportKind requested = TransportKind::kAuto;
  bool force_collectives = false;
  bool debug_check = false;
  ShmSettings shm;  // FLASHCOMM_SHM_* and FLASHCOMM_DEBUG_THROW
  std::unique_ptr<Transport> transport;  // chosen at first use, kept across re-agreements
  std::shared_ptr<const AllReduceProvider> provider;  // read with atomic_load
};

namespace {

std::mutex g_groups_mu;
std::map<std::string, std::shared_ptr<GroupState>>& groups() {
  static std::map<std::string, std::shared_ptr<GroupState>> states;
  return states;
}

// The state of `key`, fresh when the name now belongs to another ProcessGroup.
std::shared_ptr<GroupState> state_for(const std::string& key, const void* identity) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  auto& slot = groups()[key];
  if (!slot || (identity != nullptr && slot->pg_identity != nullptr &&
                slot->pg_identity != identity)) {
    auto fresh = std::make_shared<GroupState>();
    fresh->requested = env_transport();
    fresh->force_collectives = env_flag("FLASHCOMM_DEBUG_FORCE_COLLECTIVES");
    fresh->debug_check = env_flag("FLASHCOMM_DEBUG_CHECK");
    fresh->shm = ShmSettings::from_env();
    slot = std::move(fresh);
  }
  if (slot->pg_identity == nullptr) slot->pg_identity = identity;
  return slot;
}

std::string key_of(const ProcessGroupPtr& pg) {
  const std::string& name = pg->getGroupName();
  if (!name.empty()) return name;
  std::ostringstream s;
  s << "pg@" << static_cast<const void*>(pg.get());
  return s.str();
}

}  // namespace

std::string error_text(const std::exception& e) {
  if (const auto* error = dynamic_cast<const c10::Error*>(&e)) {
    return error->what_without_backtrace();
  }
  return e.what();
}

void fail_collective(const char* op, const std::string& group, int64_t size, int64_t rank,
                     const char* how, const std::exception& e) {
  TORCH_CHECK(false, op, ": collective on group '", group, "' (size ", size, ", rank ", rank,
              ") failed", how, ": ", e.what());
}

Group make_group(ProcessGroupPtr pg, std::string name, const char* op) {
  TORCH_CHECK(pg, op, ": null ProcessGroup");
  Group g;
  g.state_ = state_for(name, pg.get());
  g.size_ = pg->getSize();
  g.rank_ = pg->getRank();
  g.collective_ = g.size_ > 1 || g.state_->force_collectives;
  g.name_ = std::move(name);
  g.pg_ = std::move(pg);
  return g;
}

DebugThrow debug_throw_from_env() {
  std::optional<size_t> word;
  try {
    word = core::settings::env_word("FLASHCOMM_DEBUG_THROW", {"gemm", "sum"});
  } catch (const core::settings::SettingError& e) {
    TORCH_CHECK(false, e.what(), " (a test-only hook)");
  }
  if (!word) return DebugThrow::kNone;
  return *word == 0 ? DebugThrow::kGemm : DebugThrow::kSum;
}

void debug_throw_if(DebugThrow configured, DebugThrow at) {
  if (configured != at || at == DebugThrow::kNone) return;
  throw std::runtime_error(std::string("a fault injected by FLASHCOMM_DEBUG_THROW=") +
                           (at == DebugThrow::kGemm ? "gemm" : "sum"));
}

DebugThrow debug_throw(const Group& g) { return g.state().shm.debug_throw; }

Transport& Group::transport() const {
  TORCH_INTERNAL_ASSERT(state_->transport, "flashcomm: group '", name_, "' is not ready");
  return *state_->transport;
}

Group resolve(const std::string& group_name, const char* op) {
  ProcessGroupPtr pg;
  try {
    pg = c10d::resolve_process_group(group_name);
  } catch (const std::exception&) {
    TORCH_CHECK(false, op, ": unknown group_name '", group_name,
                "': expected the group_name of an initialised c10d ProcessGroup "
                "(e.g. torch.distributed.group.WORLD.group_name)");
  }
  return make_group(std::move(pg), group_name, op);
}

Group resolve(const ProcessGroupPtr& pg, const char* op) {
  TORCH_CHECK(pg, op, ": group must be a ProcessGroup, got null");
  return make_group(pg, key_of(pg), op);
}

const char* transport_kind_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::kC10d:
      return "c10d";
    case TransportKind::kShm:
      return "shm";
    default:
      return "auto";
  }
}

TransportKind parse_transport_kind(const std::string& text, const char* what) {
  if (text == "auto") return TransportKind::kAuto;
  if (text == "c10d") return TransportKind::kC10d;
  if (text == "shm") return TransportKind::kShm;
  TORCH_CHECK(false, what, " must be 'auto', 'c10d' or 'shm', got '", text, "'");
}

namespace {

// The settings every rank must hold identically, this group's and the call's.
std::vector<core::Setting> group_settings(const GroupState& st,
                                          const std::vector<core::Setting>& call_settings) {
  std::vector<core::Setting> settings = core::global_settings();
  const auto provider = std::atomic_load(&st.provider);
  settings.push_back(
      {"all-reduce provider of the group",
       core::stable_hash(provider ? provider->op_name + "(" + provider->provider_group + ")"
                                  : std::string())});
  settings.push_back({std::string("transport request (") + transport_kind_name(st.requested) +
                          "; 0 auto, 1 c10d, 2 shm)",
                      static_cast<int64_t>(st.requested)});
  settings.push_back({"shared-memory budget FLASHCOMM_SHM_BYTES", st.shm.bytes});
  settings.push_back({"two-shot all-reduce size FLASHCOMM_SHM_TWO_SHOT_BYTES",
                      st.shm.two_shot_bytes});
  settings.push_back({"FLASHCOMM_DEBUG_CHECK", st.debug_check ? 1 : 0});
  settings.insert(settings.end(), call_settings.begin(), call_settings.end());
  return settings;
}

// Every rank's values of `settings`, exchanged over the ProcessGroup on `device`.
void agree(const Group& g, const char* op, const at::Device& device,
           const std::vector<core::Setting>& settings) {
  const int64_t tp = g.size();
  std::vector<int64_t> mine;
  for (const auto& s : settings) mine.push_back(s.value);
  at::Tensor local = at::tensor(mine, at::TensorOptions().dtype(at::kLong)).to(device);
  const std::vector<int64_t> values = exchange_over_process_group(g, local, op);
  const std::string diff = core::describe_disagreement(settings, values, tp);
  TORCH_CHECK(diff.empty(), op, ": the ranks of group '", g.name(),
              "' disagree on settings that steer collectives: ", diff,
              ". Every rank must use the same flashcomm version, thresholds, enabled flags, "
              "pipeline config, tuning table, all-reduce provider and transport; otherwise "
              "ranks would issue different collectives and hang.");
}

void setup(const Group& g, const char* op, const at::Device& device,
           const std::vector<core::Setting>& call_settings) {
  GroupState& st = g.state();
  TORCH_CHECK(!stream_is_capturing(device), op, ": the ranks of group '", g.name(),
              "' have not yet agreed on their settings and transport, which takes a "
              "collective with a host synchronisation: that cannot run while the current "
              "stream is capturing a CUDA graph. Call flashcomm.init(group, ...) (C++: "
              "flashcomm::init) on every rank before capture.");
  agree(g, op, device, group_settings(st, call_settings));
  if (!st.transport) {
    C10dOptions c10d_options;
    c10d_options.debug_check = st.debug_check;
    std::unique_ptr<Transport> chosen;
    if (st.requested != TransportKind::kC10d && g.collective()) {
      chosen = try_make_shm_transport(g, device, st.requested == TransportKind::kShm, st.shm);
    }
    st.transport = chosen ? std::move(chosen)
                          : make_c10d_transport(g.process_group_ptr(), g.name(), c10d_options);
  }
}

}  // namespace

std::vector<int64_t> exchange_over_process_group(const Group& g, const at::Tensor& local,
                                                 const char* op) {
  at::Tensor mine = local.contiguous();
  at::Tensor all = at::empty({g.size() * mine.numel()}, mine.options());
  c10d::AllgatherOptions opts;
  at::Tensor input = mine;
  auto work = compat::all_gather_single(g.process_group(), all, input, opts);
  try {
    work->wait();
  } catch (const std::exception& e) {
    fail_collective(op, g.name(), g.size(), g.rank(), "", e);
  }
  all = all.to(at::kCPU).to(at::kLong).contiguous();
  return std::vector<int64_t>(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + all.numel());
}

void ensure_ready(const Group& g, const char* op, const at::Device& device,
                  CallSettings call_settings) {
  GroupState& st = g.state();
  if (st.ready.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(st.mu);
  if (st.ready.load(std::memory_order_relaxed)) return;
  if (!g.collective()) {
    if (!st.transport) {
      st.transport = make_c10d_transport(g.process_group_ptr(), g.name(), C10dOptions());
    }
  } else {
    std::vector<core::Setting> settings;
    for (const auto& [name, value] : call_settings) settings.push_back({name, value});
    setup(g, op, device, settings);
  }
  st.ready.store(true, std::memory_order_release);
}

void verify(const Group& g, const char* op, const at::Device& device,
            const std::vector<core::Setting>& call_settings) {
  GroupState& st = g.state();
  std::lock_guard<std::mutex> lock(st.mu);
  if (g.collective()) {
    setup(g, op, device, call_settings);
  } else if (!st.transport) {
    st.transport = make_c10d_transport(g.process_group_ptr(), g.name(), C10dOptions());
  }
  st.ready.store(true, std::memory_order_release);
}

void all_reduce(const Group& g, at::Tensor& t, const CallInfo& call) {
  if (const auto provider = std::atomic_load(&g.state().provider)) {
    at::Tensor sum;
    try {
      sum = provider->handle.call(t, provider->provider_group);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "all-reduce provider ", provider->op_name, " (group '",
                  provider->provider_group, "', for c10d group '", g.name(),
                  "') failed: ", e.what());
    }
    TORCH_CHECK(sum.sizes() == t.sizes() && sum.scalar_type() == t.scalar_type(),
                "all-reduce provider ", provider->op_name, " returned ", sum.sizes(), " ",
                sum.scalar_type(), ", expected ", t.sizes(), " ", t.scalar_type());
    if (!sum.is_same(t)) t.copy_(sum);
    return;
  }
  g.transport().all_reduce(t, call);
}

bool has_all_reduce_provider(const Group& g) {
  return std::atomic_load(&g.state().provider) != nullptr;
}

void set_all_reduce_provider(const std::string& group_name, const std::string& op_name,
                             const std::string& provider_group) {
  const Group g = resolve(group_name, "set_all_reduce_provider");
  const auto sep = op_name.find("::");
  TORCH_CHECK(sep != std::string::npos && sep > 0 && sep + 2 < op_name.size(),
              "set_all_reduce_provider: op must be a qualified op name like "
              "'vllm::all_reduce', got '", op_name, "'");
  auto handle = c10::Dispatcher::singleton().findSchema({op_name, ""});
  TORCH_CHECK(handle.has_value(), "set_all_reduce_provider: no op '", op_name,
              "' is registered (is the library that defines it, e.g. vLLM, imported?)");
  std::optional<c10::TypedOperatorHandle<AllReduceFn>> typed;
  try {
    typed = handle->typed<AllReduceFn>();
  } catch (const std::exception&) {
    TORCH_CHECK(false, "set_all_reduce_provider: op '", op_name,
                "' must have the schema (Tensor tensor, str group_name) -> Tensor, got ",
                handle->schema());
  }
  auto provider = std::make_shared<const AllReduceProvider>(
      AllReduceProvider{*typed, op_name, provider_group});
  std::atomic_store(&g.state().provider, std::move(provider));
  g.state().ready.store(false, std::memory_order_release);  // the ranks compare it next
}

void clear_all_reduce_provider(const std::string& group_name) {
  const Group g = resolve(group_name, "clear_all_reduce_provider");
  std::atomic_store(&g.state().provider, std::shared_ptr<const AllReduceProvider>());
  g.state().ready.store(false, std::memory_order_release);
}

std::string all_reduce_provider(const std::string& group_name) {
  std::shared_ptr<GroupState> st;
  {
    std::lock_guard<std::mutex> lock(g_groups_mu);
    auto it = groups().find(group_name);
    if (it == groups().end()) return "";
    st = it->second;
  }
  const auto provider = std::atomic_load(&st->provider);
  return provider ? provider->op_name + "(" + provider->provider_group + ")" : std::string();
}

void set_transport(const std::string& group_name, TransportKind kind) {
  const Group g = resolve(group_name, "set_transport");
  GroupState& st = g.state();
  std::lock_guard<std::mutex> lock(st.mu);
  if (st.transport) {
    TORCH_CHECK(st.requested == kind, "set_transport: group '", group_name,
                "' already uses transport '", st.transport->name(),
                "' (chosen at its first use); set the transport before the group's first "
                "flashcomm op or flashcomm.init");
    return;
  }
  st.requested = kind;
}

std::string transport_name(const std::string& group_name) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  auto it = groups().find(group_name);
  if (it == groups().end()) return "";
  std::lock_guard<std::mutex> state_lock(it->second->mu);
  return it->second->transport ? it->second->transport->name() : "";
}

void set_capturing_for_testing(bool capturing) {
  g_capturing_for_testing.store(capturing, std::memory_order_relaxed);
}

}  // namespace flashcomm::comm
