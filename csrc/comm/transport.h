// Transports: how the ranks of one group move the ops' data (docs/DESIGN.md section 5).
//
//   c10d   any ProcessGroup (gloo, NCCL, HCCL): the transport across hosts and on
//          accelerators, and the fallback everywhere.
//   shm    host shared memory, for CPU ranks that all sit on one host: every rank
//          maps its peers' segments; a GEMM writes its partial product straight into
//          this rank's slot and the owner of a row block reduces it by reading every
//          peer's slot (no staging copy, no socket).
//
// The ops never see which one runs: they ask for plain collectives or for *steps*
// (one chunk of a fused GEMM + collective) and get buffers to write into and views
// to read from. Every rank issues the same sequence of collectives and steps with
// the same sizes (all sizes derive from rank-invariant values), which is what both
// transports rely on; the fingerprint of each collective (CallInfo + kind + bytes)
// lets them report a rank that diverges instead of hanging or reading garbage.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>

namespace flashcomm::comm {

// What the calling op is doing: part of every fingerprint and error message, so a
// rank that takes another path (other n, other mode) is named with what it chose.
struct CallInfo {
  const char* op = "flashcomm";  // the public op, e.g. "sp_row_linear"
  int64_t n = -1;                // the op's global token count, -1 if none
  int8_t mode = -1;              // core::Mode of a layout-invariant op, -1 if none
  int8_t strategy = -1;          // core::Strategy of a compact kernel, -1 if none
};

// Rethrows a failed collective as the error every transport gives: "<op>: collective
// on group '<name>' (size S, rank R) failed<how>: <what>".
[[noreturn]] void fail_collective(const char* op, const std::string& group, int64_t size,
                                  int64_t rank, const char* how, const std::exception& e);

enum class Collective : uint8_t {
  kAllReduce = 1,
  kReduceScatter = 2,
  kAllGather = 3,
};
const char* collective_name(Collective kind);

// One chunk of a fused reduction. The caller writes its partial product into
// send_buffer() and calls start(); the transport delivers the sum over ranks into
// the `out` it was given at creation. For a reduce-scatter, send_buffer() is
// [tp * block_rows, cols] (block d = the partial for rank d's rows) and out is this
// rank's [block_rows, cols]; for an all-reduce both are [rows, cols].
class ReduceStep {
 public:
  virtual ~ReduceStep() = default;
  // Where to write the partial product (row-contiguous; shm: this rank's slot).
  virtual at::Tensor send_buffer() = 0;
  // The partial is complete; the sum may arrive asynchronously (c10d) or be
  // computed here (shm).
  virtual void start() = 0;
  // `out` holds the sum; errors name the op, the group and the peer.
  virtual void wait() = 0;
};

// One chunk of a fused all-gather: every rank contributes block_rows rows of cols
// elements; after start(), block(d) is rank d's rows.
class GatherStep {
 public:
  virtual ~GatherStep() = default;
  // Where this rank writes its rows ([block_rows, cols]; shm: its own slot).
  virtual at::Tensor send_buffer() = 0;
  // Rows complete: either written into send_buffer(), or given here (`rows`,
  // [block_rows, cols] contiguous) to be sent from where they are (c10d sends
  // them in place; shm copies them into the slot).
  virtual void start(const at::Tensor* rows = nullptr) = 0;
  // Rank d's rows [block_rows, cols] (shm: a read-only view of d's slot), valid
  // until finish().
  virtual at::Tensor block(int64_t d) = 0;
  // Every rank's rows as one [tp * block_rows, cols] tensor (block d at rows
  // [d * block_rows, ...)) when the transport received them into one buffer
  // (c10d), else undefined (shm: each block stays in its owner's slot).
  virtual at::Tensor gathered() { return at::Tensor(); }
  // Done reading every block (shm: the peers may reuse their slots).
  virtual void finish() = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;

  // Steps that may be started and not yet finished at once (shm: 2, its double
  // buffer; c10d: unbounded). The engines keep to it, identically on every rank.
  virtual int max_in_flight() const = 0;
  // Bytes one step may carry per rank (shm: a slot), 0 = unbounded. Engines split
  // their chunks so every step fits; rank-invariant (the budget is agreed).
  virtual int64_t step_capacity() const = 0;

  // Plain collectives on contiguous tensors, synchronous.
  // In-place sum of `t` over the ranks.
  virtual void all_reduce(at::Tensor& t, const CallInfo& call) = 0;
  // in [tp * m, ...] -> out [m, ...]: rank r receives the sum of block r.
  virtual void reduce_scatter(at::Tensor& out, const at::Tensor& in, const CallInfo& call) = 0;
  // in [m, ...] -> out [tp * m, ...]: block d of out is rank d's in.
  virtual void all_gather(at::Tensor& out, const at::Tensor& in, const CallInfo& call) = 0;

  // Fused steps. `piece` numbers the steps of one op call (fingerprints).
  // Reduce-scatter of one chunk: out [block_rows, cols] contiguous, this rank's rows.
  virtual std::unique_ptr<ReduceStep> reduce_scatter_step(at::Tensor out, const CallInfo& call,
                                                          int piece) = 0;
  // All-reduce of one chunk: out [rows, cols] contiguous, every rank the same rows.
  virtual std::unique_ptr<ReduceStep> all_reduce_step(at::Tensor out, const CallInfo& call,
                                                      int piece) = 0;
  // All-gather of one chunk: block_rows rows of cols elements of `options` per rank.
  virtual std::unique_ptr<GatherStep> all_gather_step(int64_t block_rows, int64_t cols,
                                                      const at::TensorOptions& options,
                                                      const CallInfo& call, int piece) = 0;

  // This rank failed inside a collective and will not finish it: peers that wait on it fail
  // fast, quoting `why` (shm), instead of running into the group timeout; later collectives
  // of this rank fail too. c10d: nothing (a failed c10d collective already ends the work).
  virtual void abort(const std::string& why) noexcept { (void)why; }
};

// An exception's message for other ranks to read: without c10's backtrace.
std::string error_text(const std::exception& e);

// Runs `fn`, a part of a collective (a step's GEMM, a sum, the protocol itself). Any exception,
// whatever its type, first aborts `transport` with "<op> failed on rank R: <message>" (every
// failure inside a step must reach the peers), then propagates unchanged.
template <typename Fn>
decltype(auto) abort_on_error(Transport& transport, const char* op, int64_t rank, Fn&& fn) {
  try {
    return fn();
  } catch (const std::exception& e) {
    transport.abort(std::string(op) + " failed on rank " + std::to_string(rank) + ": " +
                    error_text(e));
    throw;
  } catch (...) {
    transport.abort(std::string(op) + " failed on rank " + std::to_string(rank) +
                    " (an exception of unknown type)");
    throw;
  }
}

}  // namespace flashcomm::comm
