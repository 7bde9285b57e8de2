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


def init_vllm_tp() -> None:
    """vLLM world + TP group over all ranks of the default group (idempotent).

    Collective: every rank must call it. vLLM's CPU communicator names its shared-memory
    segments after ``VLLM_DIST_IDENT`` (set by vLLM's CPU worker); if it is unset, ranks
    agree on one through the default group."""
    import torch.distributed as dist
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    if ps.model_parallel_is_initialized():
        return
    if not dist.is_initialized():
        raise RuntimeError("flashcomm: init_vllm_tp needs torch.distributed initialised "
                           "(dist.init_process_group) on every rank first")
    if "VLLM_DIST_IDENT" not in os.environ:
        ident = [f"flashcomm-{os.getpid()}"]
        dist.broadcast_object_list(ident, src=0)  # rank-invariant: rank 0's name
        os.environ["VLLM_DIST_IDENT"] = ident[0]
    from vllm.platforms import current_platform
    current_platform.import_kernels()  # vLLM's C ops (its CPU shared-memory all-reduce)
    rank, world = dist.get_rank(), dist.get_world_size()
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(world, rank, "env://", local_rank=rank,
                                        backend=dist.get_backend())
        ps.initialize_model_parallel(tensor_model_parallel_size=world)


def vllm_tp_transport() -> str:
    """What vLLM's TP group all-reduces with: ``"cpu-shm"`` (its shared-memory
    communicator), or the name of the module / class it falls back to."""
    from vllm.distributed import get_tp_group
    comm = get_tp_group().device_communicator
    mod = getattr(comm, "dist_module", None)
    if mod is not None and type(mod).__name__ == "_CPUSHMDistributed":
        return "cpu-shm"
    return type(comm).__name__ if mod is None else getattr(mod, "__name__", type(mod).__name__)


def destroy_vllm_tp() -> bool:
    """Release vLLM's groups made by :func:`init_vllm_tp`; the default group stays."""
    from vllm.distributed import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if ps._WORLD is not None:
        ps._WORLD.destroy()
        ps._WORLD = None
    return True
