"""Typed Python wrappers of the ``torch.ops.flashcomm`` ops.

Layout (tp = group size, r = group rank, c = ceil(n / tp)): a token-sharded
activation is a compact ``[c, H]`` tensor; rank r holds global token rows
``[r*c, r*c + c)`` and rows at or past n are zero padding.

Every op chooses its kernel strategy per call, from the global token count:
``pipelined`` iff ``enabled and tp > 1 and n > threshold``, else ``sequential``.
``threshold < 0`` means auto (tuning table, else 1000). Both strategies give the
same layout; :func:`flashcomm.stats` counts which one ran.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from . import _loader

_loader.load()

Group = Union[dist.ProcessGroup, str, None]

def _defaults() -> dict[str, int]:
    names, values = torch.ops.flashcomm.defaults()
    return dict(zip(names, (int(v) for v in values)))


# The library's defaults (include/flashcomm/defaults.h), the only place they are written.
DEFAULTS: dict[str, int] = _defaults()
DEFAULT_THRESHOLD: int = DEFAULTS["threshold"]
DEFAULT_SP_THRESHOLD: int = DEFAULTS["sp_threshold"]


def group_name(group: Group) -> str:
    """c10d name of ``group``: a ProcessGroup, a name, or None for the default group."""
    if isinstance(group, str):
        return group
    if group is None:
        group = dist.group.WORLD
        if group is None:
            raise RuntimeError(
                "flashcomm: no group given and torch.distributed is not initialised; "
                "call dist.init_process_group() or pass a ProcessGroup / group_name"
            )
    return group.group_name


def gemm_rs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    group: Group = None,
    threshold: int = DEFAULT_THRESHOLD,
    enabled: bool = True,
) -> torch.Tensor:
    """Row-parallel GEMM fused with reduce-scatter.

    Args:
        x: ``[n, K_r]``, this rank's slice of the input features for all n tokens.
        weight: ``[N, K_r]`` (nn.Linear layout), same dtype as ``x``.
        bias: ``[N]`` or None. Added exactly once per row (by rank 0 before the
            reduction), so pass it on rank 0 only or on every rank.
        group: the tensor-parallel group (ProcessGroup, its ``group_name``, or None
            for the default group).
        threshold: pipelined iff ``n > threshold`` (and tp > 1); ``< 0`` = auto.
        enabled: False forces the sequential strategy.

    Returns:
        ``[ceil(n / tp), N]``: this rank's block of ``sum_ranks(x_r @ W_r^T) + bias``,
        rows at or past n zero. ``[n, N]`` when tp == 1.
    """
    return torch.ops.flashcomm.gemm_rs(x, weight, bias, group_name(group), threshold, enabled)


def ag_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    group: Group,
    num_tokens: Union[int, torch.SymInt],
    threshold: int = DEFAULT_THRESHOLD,
    enabled: bool = True,
    gather_output: bool = False,
) -> torch.Tensor:
    """All-gather of token shards fused with a column-parallel GEMM.

    Args:
        x: ``[ceil(num_tokens / tp), K]``, this rank's token shard.
        weight: ``[N_r, K]``, this rank's output-feature slice.
        bias: ``[N_r]`` or None, this rank's slice.
        group: the tensor-parallel group.
        num_tokens: the global token count n (padding rows are dropped).
        gather_output: also all-gather the output features.

    Returns:
        ``[num_tokens, N_r]``, or ``[num_tokens, N_r * tp]`` (ranks' features
        concatenated in rank order) with ``gather_output``.
    """
    return torch.ops.flashcomm.ag_gemm(
        x, weight, bias, group_name(group), num_tokens, threshold, enabled, gather_output
    )


def gemm_rs_w8a8(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: Optional[torch.Tensor] = None,
    input_zero_point: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    group: Group = None,
    out_dtype: torch.dtype = torch.bfloat16,
    threshold: int = DEFAULT_THRESHOLD,
    enabled: bool = True,
) -> torch.Tensor:
    """W8A8 :func:`gemm_rs`.

    Args:
        x: ``[n, K_r]`` floating point (quantised inside) or int8 (then
            ``input_scale`` is required, ``[1]`` or per-token ``[n, 1]``).
        weight: int8 ``[N, K_r]``.
        weight_scale: float32 per-channel ``[N]`` / ``[N, 1]`` or per-tensor ``[1]``.
        input_scale: float32 ``[1]``: static per-tensor quantisation; None: dynamic
            per-token symmetric.
        input_zero_point: int32 ``[1]`` for asymmetric static quantisation.
        bias: ``[N]`` floating point, added in fp32 once per row.
        out_dtype: float32, float16 or bfloat16.

    Returns:
        ``[ceil(n / tp), N]`` in ``out_dtype`` (``[n, N]`` when tp == 1).
    """
    return torch.ops.flashcomm.gemm_rs_w8a8(
        x, weight, weight_scale, input_scale, input_zero_point, bias, group_name(group),
        out_dtype, threshold, enabled,
    )


def ag_gemm_w8a8(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: Optional[torch.Tensor],
    input_zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    group: Group,
    num_tokens: Union[int, torch.SymInt],
    out_dtype: torch.dtype = torch.bfloat16,
    threshold: int = DEFAULT_THRESHOLD,
    enabled: bool = True,
    gather_output: bool = False,
) -> torch.Tensor:
    """W8A8 :func:`ag_gemm`: the shard is quantised first, int8 rows (and per-token
    scales) are all-gathered. ``x`` int8 takes ``input_scale`` ``[1]`` or ``[c, 1]``.

    Returns:
        ``[num_tokens, N_r]`` (or ``[num_tokens, N_r * tp]``) in ``out_dtype``.
    """
    return torch.ops.flashcomm.ag_gemm_w8a8(
        x, weight, weight_scale, input_scale, input_zero_point, bias, group_name(group),
        num_tokens, out_dtype, threshold, enabled, gather_output,
    )


def library_version() -> str:
    """Version of the loaded op library (pyproject.toml's, compiled in)."""
    return str(torch.ops.flashcomm.version())


def cpu_features() -> list[str]:
    """What flashcomm's CPU paths use in this process: first the ISA of its multi-ISA
    kernels ("default", "avx2" or "avx512": ATen's capability, ``ATEN_CPU_CAPABILITY``),
    then the extensions it may use for its own kernels and its choice of oneDNN's packed
    GEMMs ("avx_vnni", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"): those of
    this CPU that ``ONEDNN_MAX_CPU_ISA`` admits."""
    return str(torch.ops.flashcomm.cpu_features()).split()


def stats() -> dict[str, dict[str, int]]:
    """Calls per op and path since the last reset (this process only): the kernel
    strategy of the compact ops, the layout mode of the layout-invariant ops, e.g.
    ``{"gemm_rs": {"sequential": 3, "pipelined": 1}, ...,
    "sp_row_linear": {"replicated": 2, "sharded": 1}, ...}``; and the shared-memory
    transport's steps by algorithm: ``"shm_all_reduce": {"one_shot", "two_shot"}`` and
    ``"shm_reduce": {"inline", "overlapped"}`` (reduce-scatter sums on the calling thread
    or on the helper thread)."""
    names, counts = torch.ops.flashcomm.stats()
    out: dict[str, dict[str, int]] = {}
    for name, count in zip(names, counts):
        op, strategy = name.rsplit(".", 1)
        out.setdefault(op, {})[strategy] = int(count)
    return out


def reset_stats() -> None:
    """Zeroes every counter of :func:`stats`."""
    torch.ops.flashcomm.reset_stats()


def set_pipeline_config(max_chunks: int = DEFAULTS["max_chunks"],
                        min_chunk_rows: int = DEFAULTS["min_chunk_rows"]) -> None:
    """Chunking of the pipelined strategy: at most ``max_chunks`` collectives per
    call, each moving at least ``min_chunk_rows`` rows of every rank block. It
    steers the collective pattern, so set it identically on every rank."""
    torch.ops.flashcomm.set_pipeline_config(max_chunks, min_chunk_rows)


def set_bitwise_modes(on: bool) -> None:
    """Bitwise mode invariance (``FLASHCOMM_BITWISE_MODES``, default off): when on,
    every layout-invariant op returns bitwise the same rows whether a call runs
    replicated or sharded, on every transport and tp (README, "Numerics across the
    threshold"). It steers collectives: set it identically on every rank, then call
    :func:`init` (the ranks compare it)."""
    torch.ops.flashcomm.set_bitwise_modes(bool(on))


def bitwise_modes() -> bool:
    """Whether bitwise mode invariance is on."""
    return bool(torch.ops.flashcomm.bitwise_modes())


def get_pipeline_config() -> tuple[int, int]:
    """``(max_chunks, min_chunk_rows)`` currently in force."""
    max_chunks, min_rows = torch.ops.flashcomm.get_pipeline_config()
    return int(max_chunks), int(min_rows)


def set_all_reduce_provider(group: Group, op: str = "vllm::all_reduce",
                            provider_group: str = "") -> None:
    """Routes flashcomm's all-reduces on ``group`` (the replicated path of the
    row-parallel ops) through ``op`` instead of the c10d ProcessGroup.

    ``op`` is a registered torch op with vLLM's schema ``all_reduce(Tensor tensor,
    str group_name) -> Tensor``; ``provider_group`` is the name it knows the same ranks
    by (vLLM: ``GroupCoordinator.unique_name``, e.g. ``"tp:0"``). Inside vLLM this lets
    decode-sized calls use vLLM's own communicator (shared memory on CPU, custom
    all-reduce / pynccl on CUDA). Reduce-scatters and all-gathers stay on the
    ProcessGroup. Set it identically on every rank (the ranks compare it at the
    group's next use). Raises if ``op`` is not registered."""
    torch.ops.flashcomm.set_all_reduce_provider(group_name(group), op, provider_group)


def clear_all_reduce_provider(group: Group) -> None:
    """Back to the c10d ProcessGroup for ``group``'s all-reduces."""
    torch.ops.flashcomm.clear_all_reduce_provider(group_name(group))


def all_reduce_provider(group: Group) -> str:
    """``"op(provider_group)"`` of ``group``'s all-reduce provider, ``""`` if none."""
    return str(torch.ops.flashcomm.all_reduce_provider(group_name(group)))


def transport(group: Group = None) -> str:
    """Transport ``group`` uses: ``"shm"`` (host shared memory) or ``"c10d"`` (its
    ProcessGroup); ``""`` before the group's first flashcomm op or :func:`init`."""
    return str(torch.ops.flashcomm.transport(group_name(group)))


def _default_device(group: Group) -> torch.device:
    """Where the agreement collective runs: the device the group's backend serves
    (NCCL: the current CUDA device; HCCL: the current NPU; else the CPU)."""
    try:
        if isinstance(group, str):
            pg = dist.distributed_c10d._resolve_process_group(group)
        else:
            pg = dist.group.WORLD if group is None else group
        backend = str(dist.get_backend(pg)).lower() if pg is not None else "gloo"
    except Exception:  # a group this process is not part of, or a name only
        backend = "gloo"
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if "hccl" in backend and hasattr(torch, "npu"):
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def init(group: Group = None, *, sp_threshold: Optional[int] = None,
         threshold: Optional[int] = None, enabled: Optional[bool] = None,
         transport: Optional[str] = None, bitwise_modes: Optional[bool] = None,
         device: Union[str, torch.device, None] = None, **settings: int) -> None:
    """Verifies that every rank of ``group`` holds the same collective-steering
    configuration -- library version, pipeline chunking, tuning table, all-reduce
    provider, transport, and the settings given here (e.g. the model-wide
    ``sp_threshold``) -- and chooses the group's transport. Call it on every rank (it
    is a collective). A difference raises the same RuntimeError on every rank,
    naming each differing setting and every rank's value.

    The ops also run this check by themselves at a group's first use (with that
    first call's thresholds). Call ``init`` explicitly before capturing a CUDA graph
    (the check synchronises with the host, which capture forbids), and again after
    changing the pipeline config or the tuning table.

    Args:
        transport: ``"auto"`` (default: ``FLASHCOMM_TRANSPORT``, else host shared
            memory when every rank is a CPU process on this host, else c10d),
            ``"shm"`` or ``"c10d"``; only before the group's first use.
        bitwise_modes: sets :func:`set_bitwise_modes` (process-wide) before the
            check, which compares it across the ranks.
        device: where the check's collective runs; default: the device the group's
            backend serves (gloo: CPU, NCCL: the current CUDA device, HCCL: NPU).
    """
    name = group_name(group)
    if transport is not None:
        torch.ops.flashcomm.set_transport(name, transport)
    if bitwise_modes is not None:
        set_bitwise_modes(bitwise_modes)
    named = dict(settings)
    for key, value in (("sp_threshold", sp_threshold), ("threshold", threshold),
                       ("enabled", enabled)):
        if value is not None:
            named[key] = value
    names = sorted(named)
    values = [int(named[key]) for key in names]
    dev = torch.device(device) if device is not None else _default_device(group)
    torch.ops.flashcomm.verify_agreement(name, names, values, dev)
