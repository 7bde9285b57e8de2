// ProcessGroup collectives whose names changed between the torch releases flashcomm
// supports (2.11 through 2.13):
//   torch >= 2.12: reduce_scatter_single / all_gather_single (the old names remain as
//                  deprecated aliases);
//   torch 2.11:    only _reduce_scatter_base / _allgather_base.
// Both pairs have the same contract: `in` and `out` are contiguous; reduce-scatter
// sums `in` ([tp * m, ...]) over ranks and leaves block `rank` ([m, ...]) in `out`;
// all-gather writes rank r's `in` ([m, ...]) into block r of `out` ([tp * m, ...]).
//
// The method is picked at compile time by detecting the member on c10d::ProcessGroup
// (not by TORCH_VERSION_*), so a build against headers where the new name exists never
// touches the deprecated one, and one where it does not never names the new one.
//
// Also the stream-capture query the agreement check needs: c10::Stream::is_capturing()
// exists from torch 2.12 on; for 2.11 see stream_is_capturing() below.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Stream.h>
#include <dlfcn.h>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <type_traits>
#include <utility>

namespace flashcomm::comm::compat {

namespace detail {

template <typename PG, typename = void>
struct HasReduceScatterSingle : std::false_type {};
template <typename PG>
struct HasReduceScatterSingle<
    PG, std::void_t<decltype(std::declval<PG&>().reduce_scatter_single(
            std::declval<at::Tensor&>(), std::declval<at::Tensor&>(),
            std::declval<const c10d::ReduceScatterOptions&>()))>> : std::true_type {};

template <typename PG, typename = void>
struct HasAllGatherSingle : std::false_type {};
template <typename PG>
struct HasAllGatherSingle<
    PG, std::void_t<decltype(std::declval<PG&>().all_gather_single(
            std::declval<at::Tensor&>(), std::declval<at::Tensor&>(),
            std::declval<const c10d::AllgatherOptions&>()))>> : std::true_type {};

// Templates so that only the branch of the detected API is instantiated.
template <typename PG>
c10::intrusive_ptr<c10d::Work> reduce_scatter_single(PG& pg, at::Tensor& out, at::Tensor& in,
                                                     const c10d::ReduceScatterOptions& opts) {
  if constexpr (HasReduceScatterSingle<PG>::value) {
    return pg.reduce_scatter_single(out, in, opts);
  } else {
    return pg._reduce_scatter_base(out, in, opts);
  }
}

template <typename PG>
c10::intrusive_ptr<c10d::Work> all_gather_single(PG& pg, at::Tensor& out, at::Tensor& in,
                                                 const c10d::AllgatherOptions& opts) {
  if constexpr (HasAllGatherSingle<PG>::value) {
    return pg.all_gather_single(out, in, opts);
  } else {
    return pg._allgather_base(out, in, opts);
  }
}

template <typename S, typename = void>
struct HasIsCapturing : std::false_type {};
template <typename S>
struct HasIsCapturing<S, std::void_t<decltype(std::declval<const S&>().is_capturing())>>
    : std::true_type {};

// torch 2.11 has no backend-neutral capture query. A CUDA stream is asked through the
// CUDA runtime torch has already loaded (libtorch_global_deps puts libcudart in the
// global symbol scope), so this library needs no CUDA headers or link dependency.
// No runtime loaded: no CUDA work can be capturing.
inline bool cuda_stream_is_capturing(void* native_stream) {
  using IsCapturingFn = int (*)(void* stream, int* status);  // cudaStreamIsCapturing
  using GetLastErrorFn = int (*)();                          // cudaGetLastError
  static const auto is_capturing =
      reinterpret_cast<IsCapturingFn>(dlsym(RTLD_DEFAULT, "cudaStreamIsCapturing"));
  static const auto get_last_error =
      reinterpret_cast<GetLastErrorFn>(dlsym(RTLD_DEFAULT, "cudaGetLastError"));
  if (is_capturing == nullptr) return false;
  int status = 0;  // cudaStreamCaptureStatus: 0 none, 1 active, 2 invalidated
  if (is_capturing(native_stream, &status) != 0) {
    // E.g. the legacy stream while another stream captures: treat as capturing, and
    // clear the error so that torch's next kernel-launch check does not report it.
    if (get_last_error != nullptr) get_last_error();
    return true;
  }
  return status != 0;
}

template <typename S>
bool stream_is_capturing(const S& stream) {
  if constexpr (HasIsCapturing<S>::value) {
    return stream.is_capturing();
  } else {
    if (stream.device_type() != c10::DeviceType::CUDA) return false;
    return cuda_stream_is_capturing(stream.native_handle());
  }
}

}  // namespace detail

// True while `stream` records work for graph capture (CUDA graphs). torch >= 2.12:
// c10::Stream::is_capturing(); torch 2.11: CUDA streams through the CUDA runtime, any
// other backend false.
inline bool stream_is_capturing(const c10::Stream& stream) {
  return detail::stream_is_capturing<c10::Stream>(stream);
}

// True when the headers have the torch >= 2.12 names (for tests and diagnostics).
inline constexpr bool kHasSingleCollectives =
    detail::HasReduceScatterSingle<c10d::ProcessGroup>::value &&
    detail::HasAllGatherSingle<c10d::ProcessGroup>::value;

// Async reduce-scatter (op `opts.reduceOp`) of `in` [tp * m, ...] into `out` [m, ...].
inline c10::intrusive_ptr<c10d::Work> reduce_scatter_single(
    c10d::ProcessGroup& pg, at::Tensor& out, at::Tensor& in,
    const c10d::ReduceScatterOptions& opts = c10d::ReduceScatterOptions()) {
  return detail::reduce_scatter_single<c10d::ProcessGroup>(pg, out, in, opts);
}

inline c10::intrusive_ptr<c10d::Work> reduce_scatter_single(
    const c10::intrusive_ptr<c10d::ProcessGroup>& pg, at::Tensor& out, at::Tensor& in,
    const c10d::ReduceScatterOptions& opts = c10d::ReduceScatterOptions()) {
  return reduce_scatter_single(*pg, out, in, opts);
}

// Async all-gather of `in` [m, ...] into `out` [tp * m, ...], blocks in rank order.
inline c10::intrusive_ptr<c10d::Work> all_gather_single(
    c10d::ProcessGroup& pg, at::Tensor& out, at::Tensor& in,
    const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) {
  return detail::all_gather_single<c10d::ProcessGroup>(pg, out, in, opts);
}

inline c10::intrusive_ptr<c10d::Work> all_gather_single(
    const c10::intrusive_ptr<c10d::ProcessGroup>& pg, at::Tensor& out, at::Tensor& in,
    const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) {
  return all_gather_single(*pg, out, in, opts);
}

}  // namespace flashcomm::comm::compat
