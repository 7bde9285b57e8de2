"""vLLM general plugin: ``FLASHCOMM_ENABLE=1`` turns flashcomm on for supported models.

Entry point (pyproject): ``[project.entry-points."vllm.general_plugins"]
flashcomm = "flashcomm.vllm.plugin:register"``. vLLM calls :func:`register` in every
process (API server / ``LLM``, engine core, each worker) before distributed init and
before the model is built. Without ``FLASHCOMM_ENABLE=1`` it does nothing (and imports
nothing from vLLM).

Environment:

* ``FLASHCOMM_ENABLE=1``: enable (``0`` / unset: off, vLLM unchanged).
* ``FLASHCOMM_SP_THRESHOLD`` (default ``auto``): forwards with more tokens than this run
  sequence-parallel (sharded); the others run as plain TP (replicated). ``auto``: measured
  on the model at start-up and cached (:mod:`flashcomm.vllm.calibration`).
* ``FLASHCOMM_TUNING_FILE``: a table from ``flashcomm tune``: its kernel thresholds apply,
  and its ``sp_threshold`` (if it has one) replaces ``auto``.
* ``FLASHCOMM_THRESHOLD`` (default -1 = auto): the compact kernels' pipelining threshold.
* ``FLASHCOMM_VLLM_ALL_REDUCE`` (default: auto): ``1``: the replicated path all-reduces
  through vLLM's own communicator (``vllm::all_reduce``: custom all-reduce / pynccl on
  CUDA, shared memory on CPU); ``0``: through flashcomm's transport for the group. Auto:
  flashcomm's when its transport is shared memory (measured faster than vLLM's on CPU:
  BENCHMARKS.md), vLLM's otherwise.
* ``FLASHCOMM_VLLM_ALLOW_UNTESTED=1``: run on a vLLM version flashcomm was not tested
  with (:data:`flashcomm.vllm._compat.TESTED_VLLM_VERSIONS`; otherwise refused), with a
  warning.
* ``FLASHCOMM_STATS_FILE``: each worker that converted a model keeps
  ``<FLASHCOMM_STATS_FILE>.<pid>`` up to date while it runs (rewritten atomically every
  ``FLASHCOMM_STATS_INTERVAL`` seconds, default 10, and at a clean exit), so the counters
  of a running server can be read without stopping it. JSON: ``{"pid", "rank",
  "tp_size", "time", "converted", "sp_threshold", "flashcomm_config" (what the
  conversion recorded in vLLM's ``additional_config``), "stats": flashcomm.stats()}``.

What :func:`register` does, in each process: refuses an untested vLLM version
(:func:`flashcomm.vllm._compat.check_vllm_version`), registers flashcomm's subclasses of
vLLM's parallel linear layers and RMSNorm under the original names
(``PluggableLayer.register_oot`` / ``CustomOp.register_oot``) and wraps
``BaseModelLoader.create_model``: after the model is built and before its weights load,
:func:`flashcomm.vllm.layers.convert_model` validates the configuration and the model
(refusing unsupported ones with a message) and activates the boundary layers; with
``sp_threshold=auto`` the wrapped ``load_model`` then, once the weights have loaded and
before the first forward, measures the threshold (or reads it from the cache) and
switches the layers to it (:func:`flashcomm.vllm.calibration.after_load`). Loaders
that build the model without ``create_model`` (TensorizerLoader, the weight-cache
IpcModelLoader) are not converted: ``load_model`` of every loader class (those defined
later too) is wrapped to log a WARNING starting ``flashcomm: NOT active`` that names the
loader when the model it returns was not converted.

Logging goes to the ``vllm.flashcomm`` logger, a child of vLLM's ``vllm`` logger, so it
is printed by vLLM's own handler, with vLLM's process prefix (``(Worker_TP0 pid=..)``):
each worker logs one INFO line starting ``flashcomm: active`` when it converted its
model, and a refusal is logged at ERROR (with the reason) before it is raised.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
from typing import Any, Optional

from flashcomm._atomic_write import write_json_atomic

from . import _compat, calibration

ENV_ENABLE = "FLASHCOMM_ENABLE"
ENV_SP_THRESHOLD = "FLASHCOMM_SP_THRESHOLD"
ENV_THRESHOLD = "FLASHCOMM_THRESHOLD"
ENV_STATS_FILE = "FLASHCOMM_STATS_FILE"
ENV_STATS_INTERVAL = "FLASHCOMM_STATS_INTERVAL"
ENV_VLLM_ALL_REDUCE = "FLASHCOMM_VLLM_ALL_REDUCE"
DEFAULT_STATS_INTERVAL_S = 10.0

# A child of vLLM's "vllm" logger: vLLM's logging configuration (handler, format,
# VLLM_LOGGING_LEVEL, VLLM_LOGGING_CONFIG_PATH) applies to it in every vLLM process.
logger = logging.getLogger("vllm.flashcomm")

ACTIVE_MARKER = "flashcomm: active"
UNCONVERTED_MARKER = "flashcomm: NOT active"

_REGISTERED = False
_STATS_WRITER: Optional["_StatsWriter"] = None


def _bool_env(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


def enabled() -> bool:
    return _bool_env(ENV_ENABLE, False)


def vllm_all_reduce() -> Optional[bool]:
    """Whether replicated calls all-reduce through vLLM's communicator (True), through
    flashcomm's transport (False), or as the transport decides (None: unset)."""
    if not os.environ.get(ENV_VLLM_ALL_REDUCE, "").strip():
        return None
    return _bool_env(ENV_VLLM_ALL_REDUCE, True)


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"flashcomm: {name} must be an integer, got {raw!r}") from None


def sp_threshold() -> "int | str":
    """``FLASHCOMM_SP_THRESHOLD``: an int >= 0, or "auto" (the default: measured at
    start-up, :mod:`flashcomm.vllm.calibration`)."""
    from .calibration import AUTO, parse_sp_threshold
    raw = os.environ.get(ENV_SP_THRESHOLD, "").strip()
    return parse_sp_threshold(raw or AUTO, ENV_SP_THRESHOLD)


def kernel_threshold() -> int:
    return _int_env(ENV_THRESHOLD, -1)


def stats_interval_s() -> float:
    raw = os.environ.get(ENV_STATS_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_STATS_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"flashcomm: {ENV_STATS_INTERVAL} must be a number of seconds > 0, "
                         f"got {raw!r}")
    return value


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Idempotent; no-op unless enabled.
    Raises :class:`~flashcomm.vllm._compat.FlashcommUnsupportedError` (logged at ERROR)
    on an untested vLLM version or when a vLLM symbol flashcomm uses is missing."""
    global _REGISTERED
    if _REGISTERED or not enabled():
        return
    try:
        _compat.check_vllm_version()
        spt, thr = sp_threshold(), kernel_threshold()
        if os.environ.get(ENV_STATS_FILE):
            stats_interval_s()  # a bad value fails here, in every process, not in a thread
        from . import layers  # resolves vLLM's layer classes
        layers.install()
        _patch_model_loader(spt, thr, vllm_all_reduce())
    except _compat.FlashcommUnsupportedError as e:
        logger.error("%s", e)
        raise
    _REGISTERED = True


def _patch_model_loader(spt: "int | str", thr: int,
                        use_vllm_all_reduce: Optional[bool]) -> None:
    BaseModelLoader = _compat.symbol("BaseModelLoader")
    original = BaseModelLoader.create_model
    if getattr(original, "_flashcomm_wrapped", False):
        return

    def create_model(self, vllm_config, model_config, prefix: str = ""):
        from . import layers
        try:
            layers.check_config(vllm_config)  # refuse before anything is built
            model = original(self, vllm_config=vllm_config, model_config=model_config,
                             prefix=prefix)
            start, how = calibration.initial_threshold(spt, calibration.tuning_file())
            converted = layers.convert_model(model, vllm_config, start, thr,
                                             use_vllm_all_reduce)
        except _compat.FlashcommUnsupportedError as e:
            logger.error("%s", e)
            raise
        if how == calibration.AUTO:  # measured once the weights load: _announce then
            calibration.defer(model, vllm_config, converted, thr)
            return model
        _announce(model, vllm_config, converted, thr, how)
        return model

    create_model._flashcomm_wrapped = True
    BaseModelLoader.create_model = create_model
    _watch_loaders(BaseModelLoader)


def _announce(model: Any, vllm_config: Any, converted: int, thr: int, how: str) -> None:
    """The ``flashcomm: active`` line and the stats writer, once the threshold is known."""
    record = _conversion_record(vllm_config)
    effective = int(record["sp_threshold"])  # raised above CUDA-graph sizes
    _log_active(model, vllm_config, converted, effective, thr, how)
    if os.environ.get(ENV_STATS_FILE):
        _start_stats_writer(os.environ[ENV_STATS_FILE], converted, effective, record)


def _converted(model: Any) -> bool:
    modules = getattr(model, "modules", None)
    return callable(modules) and any(getattr(m, "_fc_state", None) is not None
                                     for m in modules())


def _wrap_load_model(cls: type) -> None:
    """Wrap ``cls.load_model`` (where ``cls`` defines it) so that a model it returns
    unconverted is reported: with ``FLASHCOMM_ENABLE=1`` every model built through
    ``create_model`` is either converted or refused, so an unconverted model means the
    loader built it another way (TensorizerLoader and vLLM's weight-cache
    IpcModelLoader call ``initialize_model`` directly)."""
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, "_flashcomm_wrapped", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        if calibration.pending(model):  # weights loaded, nothing compiled yet
            p = model.__dict__["_fc_calibration"]
            _, how = calibration.after_load(model)
            _announce(model, p.vllm_config, p.converted, p.threshold, how)
        if not _converted(model) and not getattr(model, "_flashcomm_unconverted", False):
            try:
                model._flashcomm_unconverted = True  # one warning per model (nested loaders)
            except Exception:  # pragma: no cover - a model that takes no attributes
                pass
            load_format = getattr(getattr(self, "load_config", None), "load_format", None)
            logger.warning(
                "%s: vLLM's model loader %s (load_format %r) built the model without "
                "BaseModelLoader.create_model, where flashcomm converts it: %s=1 is set "
                "but this worker runs WITHOUT flashcomm (vLLM's own collectives). Load "
                "the model with another load format (e.g. 'auto') to use flashcomm.",
                UNCONVERTED_MARKER, type(self).__name__, load_format, ENV_ENABLE)
        return model

    load_model._flashcomm_wrapped = True
    cls.load_model = load_model


def _watch_loaders(BaseModelLoader: type) -> None:
    """Report loaders that skip ``create_model`` (:func:`_wrap_load_model`): every
    loader class vLLM defines (its loader registry is imported first), and through
    ``BaseModelLoader.__init_subclass__`` every loader class defined later (out-of-tree
    loaders registered with ``register_model_loader``)."""
    _compat.symbol("get_model_loader")  # imports vLLM's loader registry and its loaders
    seen: set[type] = set()
    stack = [BaseModelLoader]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        _wrap_load_model(cls)
        stack.extend(cls.__subclasses__())
    previous = BaseModelLoader.__dict__.get("__init_subclass__")  # a classmethod or None
    if getattr(getattr(previous, "__func__", None), "_flashcomm_wrapped", False):
        return

    def __init_subclass__(cls, **kwargs):
        if previous is not None:
            previous.__get__(None, cls)(**kwargs)
        else:
            super(BaseModelLoader, cls).__init_subclass__(**kwargs)
        _wrap_load_model(cls)

    __init_subclass__._flashcomm_wrapped = True
    BaseModelLoader.__init_subclass__ = classmethod(__init_subclass__)


def _tp_group_info() -> dict[str, Any]:
    """This worker's TP rank and size, and the c10d name of its TP group."""
    tp = _compat.symbol("get_tp_group")()
    return {"rank": tp.rank_in_group, "tp_size": tp.world_size,
            "group": tp.device_group.group_name}


def _conversion_record(vllm_config: Any) -> dict[str, Any]:
    """What :func:`flashcomm.vllm.layers.convert_model` recorded in the worker's
    ``additional_config["flashcomm"]`` (the settings that enter vLLM's compile cache
    key: GEMM form, transport, all-reduce provider, ...); {} if nothing."""
    extra = getattr(vllm_config, "additional_config", None)
    record = extra.get("flashcomm") if isinstance(extra, dict) else None
    return dict(record) if isinstance(record, dict) else {}


def _log_active(model: Any, vllm_config: Any, converted: int, spt: int, thr: int,
                how: str = "set") -> None:
    """The one INFO line per worker that says flashcomm is on, and how."""
    import flashcomm
    info, record = _tp_group_info(), _conversion_record(vllm_config)
    w8a8 = any(getattr(getattr(m, "_fc_state", None), "w8a8", False) for m in model.modules())
    transport = record.get("transport") or flashcomm.transport(info["group"])
    all_reduce = record.get("all_reduce") or flashcomm.all_reduce_provider(info["group"])
    logger.info(
        "%s on TP rank %d/%d: converted %d modules of %s (%s%s), sp_threshold=%d (%s; "
        "sequence parallel above %d tokens), kernel threshold=%s, group '%s', transport %s, "
        "replicated all-reduce via %s", ACTIVE_MARKER, info["rank"], info["tp_size"],
        converted, type(model).__name__, "W8A8" if w8a8 else "FP",
        f", GEMMs by {record['gemm']}" if record.get("gemm") else "", spt, how, spt,
        "auto" if thr < 0 else thr, info["group"], transport, all_reduce or transport)


class _StatsWriter:
    """Rewrites ``<path>.<pid>`` with this worker's counters every ``interval_s`` and at
    exit. A daemon thread: it never delays the worker's shutdown. Each write replaces
    the file atomically, so a reader always sees one complete JSON document."""

    def __init__(self, path: str, converted: int, spt: int, record: dict[str, Any],
                 interval_s: float) -> None:
        self.path = f"{path}.{os.getpid()}"
        self.converted, self.spt, self.interval_s = converted, spt, interval_s
        self.record = record
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._info = _tp_group_info()
        self._thread = threading.Thread(target=self._run, name="flashcomm-stats",
                                        daemon=True)

    def start(self) -> None:
        self.write()
        self._thread.start()
        atexit.register(self.stop)

    def write(self) -> None:
        import flashcomm
        doc = {"pid": os.getpid(), "rank": self._info["rank"],
               "tp_size": self._info["tp_size"], "time": time.time(),
               "converted": self.converted, "sp_threshold": self.spt,
               "flashcomm_config": self.record, "stats": flashcomm.stats()}
        try:
            with self._lock:  # the thread and the atexit call: the newer document wins
                write_json_atomic(self.path, doc)
        except OSError as e:
            logger.warning("flashcomm: cannot write the stats file %s: %s", self.path, e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write()

    def stop(self) -> None:
        self._stop.set()
        self.write()


def _start_stats_writer(path: str, converted: int, spt: int, record: dict[str, Any]) -> None:
    global _STATS_WRITER
    if _STATS_WRITER is not None:
        return
    _STATS_WRITER = _StatsWriter(path, converted, spt, record, stats_interval_s())
    _STATS_WRITER.start()


def worker_stats(worker=None) -> dict:
    """For ``LLM.collective_rpc(worker_stats)``: this worker's flashcomm counters, how
    many modules flashcomm converted, the transport of the TP group ("shm" / "c10d"),
    torch.compile's counters (to check that no recompilation happened) and the compile
    backend vLLM used."""
    import flashcomm
    out = {"pid": os.getpid(), "stats": flashcomm.stats(), "converted": 0,
           "all_reduce_provider": "", "transport": "", "compile_backend": None}
    try:
        from torch._dynamo.utils import counters
        out["dynamo"] = {k: dict(v) for k, v in counters.items()
                         if k in ("stats", "frames", "recompiles")}
        out["inductor"] = dict(counters.get("inductor", {}))
    except Exception:  # pragma: no cover - torch internals
        out["dynamo"], out["inductor"] = {}, {}
    try:
        out["compile_backend"] = str(worker.vllm_config.compilation_config.backend)
        out["flashcomm_config"] = _conversion_record(worker.vllm_config)
    except Exception:
        out["flashcomm_config"] = {}
    model = None
    try:
        model = worker.model_runner.get_model()
    except Exception:
        pass
    if model is not None:
        out["converted"] = sum(1 for m in model.modules()
                               if getattr(m, "_fc_state", None) is not None)
    try:
        tp = _compat.symbol("get_tp_group")()
        out["rank"] = tp.rank_in_group
        out["all_reduce_provider"] = flashcomm.all_reduce_provider(tp.device_group.group_name)
        out["transport"] = flashcomm.transport(tp.device_group.group_name)
    except Exception:
        out["rank"] = None
    return out


def worker_reset_stats(worker=None) -> bool:
    """For ``LLM.collective_rpc(worker_reset_stats)``: zero this worker's counters."""
    import flashcomm
    flashcomm.reset_stats()
    return True
