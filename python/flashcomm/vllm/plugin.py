"""vLLM general plugin: flashcomm for supported models, configured like vLLM plugins are.

Entry point (pyproject): ``[project.entry-points."vllm.general_plugins"]
flashcomm = "flashcomm.vllm.plugin:register"``. vLLM calls :func:`register` in every
process (API server / ``LLM``, engine core, each worker) before distributed init and
before the model is built, and before its configuration exists in some of them. So
:func:`register` decides nothing: it hooks the two places where vLLM's configuration is
in hand, each as soon as vLLM imports its module (it imports no vLLM module itself):

* ``EngineArgs.create_engine_config`` (the API server / ``LLM`` process, before the
  engine starts any process): :func:`check_settings` -- a bad setting, an untested vLLM
  version or a missing vLLM symbol fails start-up there, naming the key or variable.
* ``BaseModelLoader.create_model`` (each worker, after the model is built and before its
  weights load): with flashcomm enabled, registers flashcomm's subclasses of vLLM's
  parallel linear layers and RMSNorm under the original names
  (``PluggableLayer.register_oot`` / ``CustomOp.register_oot``), builds the model, and
  :func:`flashcomm.vllm.layers.convert_model` validates the configuration and the model
  (refusing unsupported ones with a message) and activates the boundary layers. Loaders
  that build the model without ``create_model`` (TensorizerLoader, the weight-cache
  IpcModelLoader) are not converted: ``load_model`` of every loader class (those defined
  later too) is wrapped to log a WARNING starting ``flashcomm: NOT active`` that names the
  loader when flashcomm is enabled and the model it returns was not converted.

With flashcomm off both hooks call vLLM's own code and return its result unchanged.

Settings (:func:`resolve_settings`, the table is :mod:`flashcomm.settings`): each from
``--additional-config '{"flashcomm": {...}}'`` (``vllm_config.additional_config``, which
vLLM hands to every process) first, then its ``FLASHCOMM_*`` variable, then the default.
``{"flashcomm": {"enable": true}}`` (or ``FLASHCOMM_ENABLE=1``) turns flashcomm on. The
library's settings (``transport``, ``shm_bytes``, ...) given there are exported to the
worker's environment before flashcomm's first collective, where its C++ code reads them.
An unknown key is a warning naming the closest valid one.

With ``sp_threshold=auto`` (the default) the wrapped ``load_model``, once the weights
have loaded and before the first forward, measures the threshold (or reads it from the
cache) and switches the converted layers to it
(:func:`flashcomm.vllm.calibration.after_load`); an explicit number, or the
``sp_threshold`` of a ``tuning_file`` table, skips the measurement.

The conversion records what the converted layers bake in (c10d group name, thresholds,
GEMM form, transport, all-reduce provider) under
``additional_config["flashcomm"]["_conversion"]``, beside the user's keys, which it never
changes: vLLM hashes ``additional_config`` into its compile cache key.

Counters of a running server: with ``stats_file`` each worker that converted a model keeps
``<stats_file>.<pid>`` up to date (rewritten atomically every ``stats_interval``
seconds and at a clean exit). JSON: ``{"pid", "rank", "tp_size", "time", "converted",
"sp_threshold", "flashcomm_config" (the conversion record), "stats": flashcomm.stats()}``.

Logging goes to the ``vllm.flashcomm`` logger, a child of vLLM's ``vllm`` logger, so it
is printed by vLLM's own handler, with vLLM's process prefix (``(Worker_TP0 pid=..)``):
each worker logs one INFO line starting ``flashcomm: active`` when it converted its
model, and a refusal is logged at ERROR (with the reason) before it is raised.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from flashcomm import settings as _settings
from flashcomm._atomic_write import write_json_atomic

from . import _compat, calibration

ENV_ENABLE = "FLASHCOMM_ENABLE"
DEFAULT_STATS_INTERVAL_S = float(_settings.setting("stats_interval").default)

# A child of vLLM's "vllm" logger: vLLM's logging configuration (handler, format,
# VLLM_LOGGING_LEVEL, VLLM_LOGGING_CONFIG_PATH) applies to it in every vLLM process.
logger = logging.getLogger("vllm.flashcomm")

ACTIVE_MARKER = "flashcomm: active"
UNCONVERTED_MARKER = "flashcomm: NOT active"
RECORD_KEY = _settings.RECORD_KEY  # additional_config["flashcomm"][RECORD_KEY]

_REGISTERED = False
_STATS_WRITER: Optional["_StatsWriter"] = None


@dataclass(frozen=True)
class PluginSettings:
    """The plugin's settings, resolved (:func:`resolve_settings`). ``library``: the
    library's settings given in ``additional_config`` as (variable, value text), exported
    to the worker's environment; ``sources``: setting key -> where its value came from."""

    enable: bool = False
    sp_threshold: Union[int, str] = _settings.setting("sp_threshold").default
    tuning_file: Optional[str] = None
    threshold: int = -1
    gemm: str = "auto"
    vllm_all_reduce: Optional[bool] = None
    stats_file: Optional[str] = None
    stats_interval: float = DEFAULT_STATS_INTERVAL_S
    allow_untested: bool = False
    library: tuple[tuple[str, str], ...] = ()
    sources: tuple[tuple[str, str], ...] = ()


def _env_text(s: _settings.Setting, value: Any) -> str:
    """A parsed value as its variable's text (what the C++ reader parses)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def resolve_settings(additional_config: Any = None) -> PluginSettings:
    """The plugin's settings from ``additional_config["flashcomm"]`` first, then the
    ``FLASHCOMM_*`` variables, then the defaults. Warns once per process about unknown
    keys. Raises :class:`flashcomm.settings.SettingError` naming the key or variable
    of a bad value. With flashcomm off, only ``enable`` and the keys of
    ``additional_config["flashcomm"]`` are checked (the other variables are not read)."""
    section = _settings.config_section(additional_config)
    _settings.warn_unknown_keys(section, logger)
    enable, enable_where = _settings.resolve(_settings.setting("enable"), section)
    values: dict[str, Any] = {"enable": bool(enable)}
    sources = [("enable", enable_where)]
    library = []
    for s in _settings.SETTINGS:
        if not s.key or s.key == "enable":
            continue
        if not enable and s.key not in section:
            continue
        if s.scope == "vllm":
            value, where = _settings.resolve(s, section)
            values[s.key] = value
            sources.append((s.key, where))
        elif s.key in section:  # the library's: exported to the worker's environment
            library.append((s.env, _env_text(s, s.parse(section[s.key], s.config_where()))))
            sources.append((s.key, s.config_where()))
    if values.get("vllm_all_reduce") == "auto":
        values["vllm_all_reduce"] = None
    if section and not enable:
        logger.warning("flashcomm: additional_config[\"%s\"] sets %s but flashcomm is off "
                       "(enable: %s); add \"enable\": true to use flashcomm",
                       _settings.CONFIG_KEY, ", ".join(sorted(section)), enable_where)
    return PluginSettings(**values, library=tuple(library), sources=tuple(sources))


def check_settings(additional_config: Any = None) -> PluginSettings:
    """:func:`resolve_settings`, and with flashcomm enabled the checks that need no
    model: the vLLM version (:func:`flashcomm.vllm._compat.check_vllm_version`) and the
    vLLM symbols of the replacement layers. Errors are logged at ERROR, then raised."""
    try:
        resolved = resolve_settings(additional_config)
        if resolved.enable:
            _compat.check_vllm_version(resolved.allow_untested)
            from . import layers  # noqa: F401  (resolves vLLM's layer classes)
    except (_settings.SettingError, _compat.FlashcommUnsupportedError) as e:
        logger.error("%s", e)
        raise
    return resolved


def enabled(additional_config: Any = None) -> bool:
    """Whether flashcomm is on for this configuration (``enable``)."""
    return bool(_settings.resolve(_settings.setting("enable"),
                                  _settings.config_section(additional_config))[0])


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a module's first import completes (vLLM's modules are
    hooked as vLLM imports them, so the plugin imports none of them itself)."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callable[[Any], None]]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        callbacks, run = self.pending.pop(fullname), spec.loader.exec_module

        def exec_module(module):
            run(module)
            for callback in callbacks:
                callback(module)

        spec.loader.exec_module = exec_module
        return spec


_AFTER_IMPORT = _AfterImport()


def _when_imported(name: str, callback: Callable[[Any], None]) -> None:
    """``callback(module)`` now if ``name`` is imported, else right after its import."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    _AFTER_IMPORT.pending.setdefault(name, []).append(callback)
    if _AFTER_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _AFTER_IMPORT)


def _quietly(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """A hook that cannot break vLLM's import when vLLM lacks a symbol it patches
    (flashcomm may be off): the refusal is logged; with flashcomm on, the same symbol
    refuses again in :func:`check_settings`."""
    def run(module: Any) -> None:
        try:
            hook(module)
        except _compat.FlashcommUnsupportedError as e:
            logger.warning("%s (flashcomm cannot hook vLLM here)", e)
    return run


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Idempotent; imports no vLLM module and
    changes nothing in vLLM by itself (see the module docstring)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _when_imported("vllm.engine.arg_utils", _quietly(_patch_engine_args))
    _when_imported("vllm.model_executor.model_loader", _quietly(_patch_model_loader))
    _REGISTERED = True


def _patch_engine_args(module: Any) -> None:
    """Checks the settings where vLLM builds its configuration from its arguments, in
    the process that starts the engine (before any engine or worker process starts)."""
    engine_args = module.EngineArgs
    original = engine_args.create_engine_config
    if getattr(original, "_flashcomm_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        check_settings(getattr(self, "additional_config", None))
        return original(self, *args, **kwargs)

    create_engine_config._flashcomm_wrapped = True
    engine_args.create_engine_config = create_engine_config


def _activate(resolved: PluginSettings) -> None:
    """This worker's side of an enabled configuration, before its model is built: the
    replacement layer classes, and the library settings of ``additional_config`` in the
    environment (flashcomm's C++ code reads them at the group's first use, later)."""
    from . import layers
    layers.install()
    for name, text in resolved.library:
        if os.environ.get(name) != text:
            logger.debug("flashcomm: %s=%s (from additional_config)", name, text)
        os.environ[name] = text


def _patch_model_loader(module: Any = None) -> None:
    BaseModelLoader = _compat.symbol("BaseModelLoader")
    original = BaseModelLoader.create_model
    if getattr(original, "_flashcomm_wrapped", False):
        return

    def create_model(self, vllm_config, model_config, prefix: str = ""):
        resolved = check_settings(getattr(vllm_config, "additional_config", None))
        if not resolved.enable:
            return original(self, vllm_config=vllm_config, model_config=model_config,
                            prefix=prefix)
        from . import layers
        try:
            _activate(resolved)
            layers.check_config(vllm_config)  # refuse before anything is built
            thr = int(resolved.threshold)
            model = original(self, vllm_config=vllm_config, model_config=model_config,
                             prefix=prefix)
            start, how = calibration.initial_threshold(resolved.sp_threshold,
                                                       resolved.tuning_file)
            converted = layers.convert_model(model, vllm_config, start, thr,
                                             resolved.vllm_all_reduce, resolved.gemm)
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
    resolved = resolve_settings(getattr(vllm_config, "additional_config", None))
    if resolved.stats_file:
        _start_stats_writer(resolved.stats_file, converted, effective, record,
                            resolved.stats_interval)


def _converted(model: Any) -> bool:
    modules = getattr(model, "modules", None)
    return callable(modules) and any(getattr(m, "_fc_state", None) is not None
                                     for m in modules())


def _enabled_for(args: tuple, kwargs: dict) -> bool:
    """Whether flashcomm is on for the ``vllm_config`` of a ``load_model`` call."""
    vllm_config = kwargs.get("vllm_config", args[0] if args else None)
    try:
        return enabled(getattr(vllm_config, "additional_config", None))
    except _settings.SettingError:
        return False  # create_model (or check_settings) reports it


def _wrap_load_model(cls: type) -> None:
    """Wrap ``cls.load_model`` (where ``cls`` defines it) so that a model it returns
    unconverted while flashcomm is enabled is reported: every model built through
    ``create_model`` is then either converted or refused, so an unconverted model means
    the loader built it another way (TensorizerLoader and vLLM's weight-cache
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
        if (not _converted(model) and not getattr(model, "_flashcomm_unconverted", False)
                and _enabled_for(args, kwargs)):
            try:
                model._flashcomm_unconverted = True  # one warning per model (nested loaders)
            except Exception:  # pragma: no cover - a model that takes no attributes
                pass
            load_format = getattr(getattr(self, "load_config", None), "load_format", None)
            logger.warning(
                "%s: vLLM's model loader %s (load_format %r) built the model without "
                "BaseModelLoader.create_model, where flashcomm converts it: flashcomm is "
                "enabled but this worker runs WITHOUT flashcomm (vLLM's own collectives). "
                "Load the model with another load format (e.g. 'auto') to use flashcomm.",
                UNCONVERTED_MARKER, type(self).__name__, load_format)
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
    ``additional_config["flashcomm"]["_conversion"]`` (the settings that enter vLLM's
    compile cache key: GEMM form, transport, all-reduce provider, ...); {} if nothing."""
    return _settings.conversion_record(getattr(vllm_config, "additional_config", None))


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


def _start_stats_writer(path: str, converted: int, spt: int, record: dict[str, Any],
                        interval_s: float) -> None:
    global _STATS_WRITER
    if _STATS_WRITER is not None:
        return
    _STATS_WRITER = _StatsWriter(path, converted, spt, record, interval_s)
    _STATS_WRITER.start()


def worker_stats(worker=None) -> dict:
    """For ``LLM.collective_rpc(worker_stats)``: this worker's flashcomm counters, how
    many modules flashcomm converted, the transport of the TP group ("shm" / "c10d"),
    torch.compile's counters (to check that no recompilation happened), the compile
    backend vLLM used and what vLLM's own TP group all-reduces with ("cpu-shm", ...)."""
    import flashcomm
    out = {"pid": os.getpid(), "stats": flashcomm.stats(), "converted": 0,
           "all_reduce_provider": "", "transport": "", "compile_backend": None,
           "vllm_tp_transport": ""}
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
        from .standalone import vllm_tp_transport
        out["vllm_tp_transport"] = vllm_tp_transport()
    except Exception:
        out["rank"] = None
    return out


def worker_reset_stats(worker=None) -> bool:
    """For ``LLM.collective_rpc(worker_reset_stats)``: zero this worker's counters."""
    import flashcomm
    flashcomm.reset_stats()
    return True
