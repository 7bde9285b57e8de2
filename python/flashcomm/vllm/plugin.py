"""vLLM general plugin: ``FLASHCOMM_ENABLE=1`` turns flashcomm on for supported models.

Entry point (pyproject): ``[project.entry-points."vllm.general_plugins"]
flashcomm = "flashcomm.vllm.plugin:register"``. vLLM calls :func:`register` in every
process (API server / ``LLM``, engine core, each worker) before distributed init and
before the model is built. Without ``FLASHCOMM_ENABLE=1`` it does nothing (and imports
nothing from vLLM).

Environment:

* ``FLASHCOMM_ENABLE=1``: enable (``0`` / unset: off, vLLM unchanged).
* ``FLASHCOMM_SP_THRESHOLD`` (default 1000): forwards with more tokens than this run
  sequence-parallel (sharded); the others run as plain TP (replicated).
* ``FLASHCOMM_THRESHOLD`` (default -1 = auto): the compact kernels' pipelining threshold.
* ``FLASHCOMM_VLLM_ALL_REDUCE`` (default 1): the replicated path all-reduces through
  vLLM's own communicator (``vllm::all_reduce``: shared memory on CPU, custom
  all-reduce / pynccl on CUDA); ``0``: through the c10d group.
* ``FLASHCOMM_STATS_FILE``: each worker writes ``flashcomm.stats()`` as JSON to
  ``<FLASHCOMM_STATS_FILE>.<pid>`` at exit.

What :func:`register` does, in each process: registers flashcomm's subclasses of
vLLM's parallel linear layers and RMSNorm under the original names
(``PluggableLayer.register_oot`` / ``CustomOp.register_oot``) and wraps
``BaseModelLoader.create_model``: after the model is built and before its weights load,
:func:`flashcomm.vllm.layers.convert_model` validates the configuration and the model
(refusing unsupported ones with a message) and activates the boundary layers.
"""

from __future__ import annotations

import atexit
import json
import os

ENV_ENABLE = "FLASHCOMM_ENABLE"
ENV_SP_THRESHOLD = "FLASHCOMM_SP_THRESHOLD"
ENV_THRESHOLD = "FLASHCOMM_THRESHOLD"
ENV_STATS_FILE = "FLASHCOMM_STATS_FILE"
ENV_VLLM_ALL_REDUCE = "FLASHCOMM_VLLM_ALL_REDUCE"
DEFAULT_SP_THRESHOLD = 1000

_REGISTERED = False


def _bool_env(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


def enabled() -> bool:
    return _bool_env(ENV_ENABLE, False)


def vllm_all_reduce() -> bool:
    """Replicated calls all-reduce through vLLM's communicator (default) or c10d."""
    return _bool_env(ENV_VLLM_ALL_REDUCE, True)


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"flashcomm: {name} must be an integer, got {raw!r}") from None


def sp_threshold() -> int:
    return _int_env(ENV_SP_THRESHOLD, DEFAULT_SP_THRESHOLD)


def kernel_threshold() -> int:
    return _int_env(ENV_THRESHOLD, -1)


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Idempotent; no-op unless enabled."""
    global _REGISTERED
    if _REGISTERED or not enabled():
        return
    spt, thr = sp_threshold(), kernel_threshold()
    from . import layers
    layers.install()
    _patch_model_loader(spt, thr, vllm_all_reduce())
    if os.environ.get(ENV_STATS_FILE):
        atexit.register(_dump_stats)
    _REGISTERED = True


def _patch_model_loader(spt: int, thr: int, use_vllm_all_reduce: bool) -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    original = BaseModelLoader.create_model
    if getattr(original, "_flashcomm_wrapped", False):
        return

    def create_model(self, vllm_config, model_config, prefix: str = ""):
        from . import layers
        layers.check_config(vllm_config)  # refuse before anything is built
        model = original(self, vllm_config=vllm_config, model_config=model_config,
                         prefix=prefix)
        layers.convert_model(model, vllm_config, spt, thr, use_vllm_all_reduce)
        return model

    create_model._flashcomm_wrapped = True
    BaseModelLoader.create_model = create_model


def worker_stats(worker=None) -> dict:
    """For ``LLM.collective_rpc(worker_stats)``: this worker's flashcomm counters, how
    many modules flashcomm converted and torch.compile's counters (to check that no
    recompilation happened)."""
    import torch
    import flashcomm
    out = {"pid": os.getpid(), "stats": flashcomm.stats(), "converted": 0,
           "all_reduce_provider": ""}
    try:
        from torch._dynamo.utils import counters
        out["dynamo"] = {k: dict(v) for k, v in counters.items()
                         if k in ("stats", "frames", "recompiles")}
    except Exception:  # pragma: no cover - torch internals
        out["dynamo"] = {}
    model = None
    try:
        model = worker.model_runner.get_model()
    except Exception:
        pass
    if model is not None:
        out["converted"] = sum(1 for m in model.modules()
                               if getattr(m, "_fc_state", None) is not None)
    try:
        from vllm.distributed import get_tp_group
        tp = get_tp_group()
        out["rank"] = tp.rank_in_group
        out["all_reduce_provider"] = flashcomm.all_reduce_provider(tp.device_group.group_name)
    except Exception:
        out["rank"] = None
    del torch
    return out


def worker_reset_stats(worker=None) -> bool:
    """For ``LLM.collective_rpc(worker_reset_stats)``: zero this worker's counters."""
    import flashcomm
    flashcomm.reset_stats()
    return True


def _dump_stats() -> None:
    path = os.environ.get(ENV_STATS_FILE)
    if not path:
        return
    try:
        import flashcomm
        stats = flashcomm.stats()
        if stats:
            with open(f"{path}.{os.getpid()}", "w") as f:
                json.dump(stats, f)
    except Exception:
        pass
