"""Every vLLM symbol (and private torch symbol) flashcomm's vLLM integration uses, in one
place, with the vLLM versions it was tested against.

The integration reaches into vLLM's classes, module globals and configuration; none of
that is a stable API. So:

* :data:`SYMBOLS` names each module-level symbol the integration imports; :func:`symbol`
  is the only way ``flashcomm.vllm`` gets one. A symbol that is gone (renamed, moved) is
  a refusal (:class:`FlashcommUnsupportedError`), never a silent skip.
* :data:`COLLECTIVE_PASSES` are vLLM's compilation passes that rewrite the collectives
  flashcomm replaces; :func:`collective_passes_on` looks each up by name and refuses when
  one it was tested with is missing (a renamed pass must not switch the check off).
* :data:`REFUSED_PARALLELISM` / :data:`REFUSED_FEATURES`: the configuration fields whose
  use flashcomm refuses, read through :func:`attribute` (missing = refusal).
* :func:`check_vllm_version`: with flashcomm enabled on a vLLM version not in
  :data:`TESTED_VLLM_VERSIONS` the plugin refuses, unless the ``allow_untested``
  setting (``FLASHCOMM_VLLM_ALLOW_UNTESTED=1``) is on (then it logs a warning and goes
  on).

This module imports nothing from vLLM until a function asks for a symbol.
"""

from __future__ import annotations

import importlib
import logging
import types
from typing import Any, Optional

from flashcomm import settings

TESTED_VLLM_VERSIONS = ("0.32.0",)
ENV_ALLOW_UNTESTED = "FLASHCOMM_VLLM_ALLOW_UNTESTED"

DISABLE_HINT = ("To run this model without flashcomm, unset FLASHCOMM_ENABLE (or set "
                "FLASHCOMM_ENABLE=0) and drop \"enable\": true from --additional-config's "
                "\"flashcomm\" object.")

# name -> (module, attribute). Private names (a leading underscore) are vLLM's or torch's
# internals: the first thing to check on a new version.
SYMBOLS: dict[str, tuple[str, str]] = {
    # Layers flashcomm subclasses or recognises.
    "RMSNorm": ("vllm.model_executor.layers.layernorm", "RMSNorm"),
    "ColumnParallelLinear": ("vllm.model_executor.layers.linear", "ColumnParallelLinear"),
    "MergedColumnParallelLinear": ("vllm.model_executor.layers.linear",
                                   "MergedColumnParallelLinear"),
    "QKVParallelLinear": ("vllm.model_executor.layers.linear", "QKVParallelLinear"),
    "RowParallelLinear": ("vllm.model_executor.layers.linear", "RowParallelLinear"),
    "LinearMethodBase": ("vllm.model_executor.layers.linear", "LinearMethodBase"),
    "UnquantizedLinearMethod": ("vllm.model_executor.layers.linear", "UnquantizedLinearMethod"),
    "CompressedTensorsLinearMethod": (
        "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors",
        "CompressedTensorsLinearMethod"),
    "CompressedTensorsW8A8Int8": (
        "vllm.model_executor.layers.quantization.compressed_tensors.schemes",
        "CompressedTensorsW8A8Int8"),
    # Out-of-tree registration of the replacement classes.
    "CustomOp": ("vllm.model_executor.custom_op", "CustomOp"),
    "PluggableLayer": ("vllm.model_executor.custom_op", "PluggableLayer"),
    "op_registry_oot": ("vllm.model_executor.custom_op", "op_registry_oot"),
    # The hook between building a model and loading its weights; the loader registry
    # (importing it defines every built-in loader class, see plugin._watch_loaders).
    "BaseModelLoader": ("vllm.model_executor.model_loader.base_loader", "BaseModelLoader"),
    "get_model_loader": ("vllm.model_executor.model_loader", "get_model_loader"),
    # Groups, platform, configuration.
    "get_tp_group": ("vllm.distributed", "get_tp_group"),
    "parallel_state": ("vllm.distributed", "parallel_state"),
    "current_platform": ("vllm.platforms", "current_platform"),
    "VllmConfig": ("vllm.config", "VllmConfig"),
    "CUDAGraphMode": ("vllm.config", "CUDAGraphMode"),
    # vLLM's environment variables (VLLM_BATCH_INVARIANT), read lazily by name.
    "envs": ("vllm", "envs"),
    "set_current_vllm_config": ("vllm.config", "set_current_vllm_config"),
    # vLLM's CPU shared-memory all-reduce module (standalone.vllm_tp_transport).
    "_CPUSHMDistributed": ("vllm.distributed.device_communicators.cpu_communicator",
                           "_CPUSHMDistributed"),
    # The c10d group of a group name (torch private; linear_method).
    "_resolve_process_group": ("torch.distributed.distributed_c10d", "_resolve_process_group"),
}

# vLLM's op with the schema all_reduce(Tensor, str group_name) -> Tensor: flashcomm's
# all-reduce provider inside vLLM (its communicator for the TP group).
VLLM_ALL_REDUCE_OP = "vllm::all_reduce"

# PassConfig fields of vLLM passes that rewrite the collectives flashcomm replaces, per
# tested version; each must exist (a rename would silently disable the refusal).
COLLECTIVE_PASSES: dict[str, tuple[str, ...]] = {"0.32.0": ("fuse_allreduce_rms",)}
# Names such passes had in other vLLM versions: refused when present and on.
COLLECTIVE_PASSES_ELSEWHERE = ("enable_sp", "fuse_gemm_comms", "enable_async_tp",
                               "enable_sequence_parallelism")


def pass_off_flag(name: str) -> str:
    """How a user turns vLLM's compilation pass ``name`` (a PassConfig field) off, on
    vLLM's command line and in Python (``LLM(...)`` / ``EngineArgs``)."""
    return (f"-cc.pass_config.{name}=false on the command line, or "
            f"compilation_config={{\"pass_config\": {{\"{name}\": False}}}} in Python")


# ParallelConfig sizes that must be 1, and VllmConfig features that must be None.
REFUSED_PARALLELISM = {
    "pipeline_parallel_size": "pipeline parallelism",
    "decode_context_parallel_size": "context parallelism",
    "prefill_context_parallel_size": "context parallelism",
}
REFUSED_FEATURES = {"lora_config": "LoRA", "speculative_config": "speculative decoding"}

logger = logging.getLogger("vllm.flashcomm")


class FlashcommUnsupportedError(RuntimeError):
    """The model or configuration cannot run with flashcomm; nothing was converted."""


def refuse(reason: str) -> FlashcommUnsupportedError:
    """The error flashcomm raises (and the plugin logs) when it will not run a model."""
    return FlashcommUnsupportedError(
        f"flashcomm: refusing to enable flashcomm for this vLLM model: {reason}. "
        f"{DISABLE_HINT}")


def installed_vllm_version() -> str:
    """``vllm.__version__`` without a local suffix (``0.32.0+cpu`` -> ``0.32.0``)."""
    import vllm

    return str(vllm.__version__).split("+", 1)[0]


def tested_version() -> str:
    """The installed vLLM version if it was tested, else the newest tested one: the
    version whose symbol lists apply."""
    version = installed_vllm_version()
    return version if version in TESTED_VLLM_VERSIONS else TESTED_VLLM_VERSIONS[-1]


def check_vllm_version(allow_untested: Optional[bool] = None) -> None:
    """Refuses an untested vLLM version, unless ``allow_untested`` (None: the
    ``FLASHCOMM_VLLM_ALLOW_UNTESTED`` variable; the plugin passes its resolved setting,
    ``additional_config`` first) is on: then logs a warning."""
    version = installed_vllm_version()
    if version in TESTED_VLLM_VERSIONS:
        return
    tested = ", ".join(TESTED_VLLM_VERSIONS)
    if allow_untested is None:
        allow_untested = bool(settings.setting(ENV_ALLOW_UNTESTED).from_env())
    if not allow_untested:
        raise refuse(f"vLLM {version} is not a version flashcomm was tested with ({tested}); "
                     f"its internals may differ. Set {ENV_ALLOW_UNTESTED}=1 (or "
                     f"\"allow_untested\": true in --additional-config's \"flashcomm\") to "
                     f"try it anyway")
    logger.warning("flashcomm: vLLM %s is not a version flashcomm was tested with (%s); "
                   "going on because allow_untested (%s) is on. Missing vLLM symbols still "
                   "refuse.", version, tested, ENV_ALLOW_UNTESTED)


def symbol(name: str) -> Any:
    """The symbol :data:`SYMBOLS` names ``name``, imported now; refuses if it is gone."""
    module, member = SYMBOLS[name]
    try:
        return getattr(importlib.import_module(module), member)
    except (ImportError, AttributeError) as e:
        raise refuse(f"{module}.{member} is missing ({type(e).__name__}: {e}); flashcomm "
                     f"was tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}, this is "
                     f"{_version_or_unknown()}") from e


def _version_or_unknown() -> str:
    try:
        return f"vLLM {installed_vllm_version()}"
    except Exception:  # vLLM not importable at all
        return "an unknown vLLM"


def attribute(obj: Any, name: str) -> Any:
    """``obj.<name>`` of a vLLM object (a configuration, a layer, a module) that
    flashcomm's checks read; refuses if it is gone."""
    if not hasattr(obj, name):
        owner = obj.__name__ if isinstance(obj, types.ModuleType) else type(obj).__name__
        raise refuse(f"vLLM's {owner} has no {name!r} any more (flashcomm reads it; tested "
                     f"with vLLM {', '.join(TESTED_VLLM_VERSIONS)}, this is "
                     f"{_version_or_unknown()})")
    return getattr(obj, name)


def collective_passes_on(pass_config: Any) -> list[str]:
    """The collective-rewriting passes enabled in ``pass_config`` (vLLM's PassConfig):
    each tested name is looked up (missing = refusal), names from other versions are
    checked where present."""
    on = [name for name in COLLECTIVE_PASSES[tested_version()]
          if attribute(pass_config, name)]
    on += [name for name in COLLECTIVE_PASSES_ELSEWHERE if getattr(pass_config, name, False)]
    return on


def clear_world_group() -> None:
    """Destroys vLLM's world group and forgets it, so vLLM can be initialised again."""
    state = symbol("parallel_state")
    world = attribute(state, "_WORLD")
    if world is not None:
        world.destroy()
        state._WORLD = None


def uses_cpu_shm_all_reduce(communicator: Any) -> bool:
    """True if a TP group's device communicator all-reduces through vLLM's CPU
    shared-memory module."""
    return isinstance(getattr(communicator, "dist_module", None), symbol("_CPUSHMDistributed"))


__all__ = ["COLLECTIVE_PASSES", "ENV_ALLOW_UNTESTED", "REFUSED_FEATURES", "REFUSED_PARALLELISM",
           "SYMBOLS", "TESTED_VLLM_VERSIONS", "VLLM_ALL_REDUCE_OP", "FlashcommUnsupportedError",
           "attribute", "check_vllm_version", "clear_world_group", "collective_passes_on",
           "installed_vllm_version", "pass_off_flag", "refuse", "symbol", "tested_version",
           "uses_cpu_shm_all_reduce"]
