"""vLLM's parallel state over an existing ``torch.distributed`` world, outside vLLM's
engine: for running vLLM's layer classes (with flashcomm's LinearMethods or layers) in
your own processes, as the tests and ``benchmarks/vllm_bench.py`` do.

``init_vllm_tp()`` makes vLLM's world group and one tensor-parallel group spanning every
rank of the already initialised default group; ``destroy_vllm_tp()`` releases vLLM's
groups (and the shared-memory segments of its CPU communicator) and leaves the default
group alone.
"""

from __future__ import annotations

import os

from . import _compat


def init_vllm_tp() -> None:
    """vLLM world + TP group over all ranks of the default group (idempotent).

    Collective: every rank must call it. vLLM's CPU communicator names its shared-memory
    segments after ``VLLM_DIST_IDENT`` (set by vLLM's CPU worker); if it is unset, ranks
    agree on one through the default group."""
    import torch.distributed as dist
    VllmConfig = _compat.symbol("VllmConfig")
    set_current_vllm_config = _compat.symbol("set_current_vllm_config")
    ps = _compat.symbol("parallel_state")
    if ps.model_parallel_is_initialized():
        return
    if not dist.is_initialized():
        raise RuntimeError("flashcomm: init_vllm_tp needs torch.distributed initialised "
                           "(dist.init_process_group) on every rank first")
    if "VLLM_DIST_IDENT" not in os.environ:
        ident = [f"flashcomm-{os.getpid()}"]
        dist.broadcast_object_list(ident, src=0)  # rank-invariant: rank 0's name
        os.environ["VLLM_DIST_IDENT"] = ident[0]
    # vLLM's C ops (its CPU shared-memory all-reduce)
    _compat.symbol("current_platform").import_kernels()
    rank, world = dist.get_rank(), dist.get_world_size()
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(world, rank, "env://", local_rank=rank,
                                        backend=dist.get_backend())
        ps.initialize_model_parallel(tensor_model_parallel_size=world)


def vllm_tp_transport() -> str:
    """What vLLM's TP group all-reduces with: ``"cpu-shm"`` (its shared-memory
    communicator), or the name of the module / class it falls back to."""
    comm = _compat.symbol("get_tp_group")().device_communicator
    if _compat.uses_cpu_shm_all_reduce(comm):
        return "cpu-shm"
    mod = getattr(comm, "dist_module", None)
    return type(comm).__name__ if mod is None else getattr(mod, "__name__", type(mod).__name__)


def destroy_vllm_tp() -> bool:
    """Release vLLM's groups made by :func:`init_vllm_tp`; the default group stays."""
    ps = _compat.symbol("parallel_state")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _compat.clear_world_group()
    return True
