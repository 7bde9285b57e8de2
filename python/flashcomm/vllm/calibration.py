"""``sp_threshold=auto``: the sequence-parallel threshold measured on the model it serves.

Where a fixed ``sp_threshold`` is a guess (the seed's 1000, vllm-ascend's 1000, vLLM's
formula for one GPU), ``auto`` times, in every worker, the model's own boundary replicated
and sharded at a ladder of token counts, on the real hidden size, dtype, norm weight,
c10d group and flashcomm transport, and uses the crossover. It runs once per start-up,
after the weights load and before vLLM's profile / warm-up runs compile the model (the
threshold is a constant in the compiled graph, and part of vLLM's compile cache key).

What is timed, and why it is representative:

* Engine form (vLLM's GEMMs; the default on CPU): every GEMM sees every row in both
  modes, so the two modes differ only at the boundaries between a row-parallel layer
  and the next norm: ``sp_reduce_`` (all-reduce, or reduce-scatter into the owned rows)
  then ``sp_add_rms_norm_`` with ``gather=True`` (norm of every row, or of the owned rows
  and an all-gather). Every boundary of the model has that shape (``[n, H]``), so one
  boundary per mode is timed, with a copy into the reduced buffer standing for the GEMM
  that writes it (the same in both modes: it moves the total, not the crossover).
* flashcomm GEMM form (fused ops): the modes also differ inside the GEMMs (the
  reduce-scatter and all-gather are pipelined with them), so both boundaries of the
  first decoder layer are timed with the model's own modules and weights: ``o_proj`` ->
  ``post_attention_layernorm`` -> ``gate_up_proj`` and ``down_proj`` -> the next
  ``input_layernorm`` -> ``qkv_proj``.

Per ladder point and mode: one warm-up call (first touch, transport buffers), then
:data:`SAMPLES` samples interleaved between the modes, each of :func:`iterations`
boundaries. The decision at a point is :func:`paired_ratio` (the upper quartile of the
per-sample sharded/replicated ratios: sharded must win in three samples out of four,
so a tie stays replicated), the slowest rank's (all-reduce MAX over the TP group's CPU
group); the times kept for the log and the cache are each rank's fastest sample, then
the slowest rank's. Ladder, sample and iteration counts depend only on rank-invariant
values (the configuration), so every rank issues the same collectives; a time budget is
checked on the all-reduced elapsed time, so every rank stops at the same point.
:func:`pick_from_ratios` then gives the same value on every rank.

Precedence: an explicit number > a tuning file's ``sp_threshold`` (``flashcomm tune``)
> ``auto``. The result is cached under vLLM's cache root, keyed with vLLM's compile cache
key and what else changes the answer (:func:`cache_key`); rank 0 reads the cache and
broadcasts hit or miss, so the ranks agree. The calibration's own calls are counted in
``flashcomm.stats()`` like any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from flashcomm import settings

from . import _compat

logger = logging.getLogger("vllm.flashcomm")

AUTO = "auto"
CACHE_FORMAT = "flashcomm-sp-threshold"
CACHE_VERSION = 3  # bumped whenever what is measured or how it is picked changes
# Ladder: token counts from LADDER_START, x sqrt(2) per step, up to the scheduler's
# max_num_batched_tokens (no batch is bigger), at most LADDER_CAP.
LADDER_START = 16
LADDER_CAP = 16384
SAMPLES = 7  # per mode and ladder point, interleaved
# Sharded must beat replicated by this fraction to count as faster (noise, and a switch
# that does not pay is not worth a mode change). At 0.05 the pick on a 2-core Xeon
# moved between 1201 and never from one start to the next at hidden 1024, where the
# boundary's modes are within 10 % above 256 tokens; at 0.10 it was "never" in 11 of 12
# (benchmarks/calibration_stability.py, results/calibration_stability_cpu2.txt).
MARGIN = 0.10
# Bytes of boundary input per sample: small boundaries are repeated up to this much
# (timer resolution), at most MAX_ITERATIONS times.
SAMPLE_BYTES = 4 << 20
MAX_ITERATIONS = 32
# Wall-clock budget of the measurement (seconds); checked after each ladder point on
# the slowest rank's elapsed time.
BUDGET_S = 4.0
# What a replicated-only threshold is passed as while timing (above every batch).
ALWAYS_REPLICATED = 1 << 62

SpThreshold = Union[int, str]




# ---------------------------------------------------------------------------------------
# Ladder and pick (pure functions of rank-invariant inputs)
# ---------------------------------------------------------------------------------------

def ladder(max_tokens: int, start: int = LADDER_START, cap: int = LADDER_CAP) -> list[int]:
    """Token counts to time: ``start`` x sqrt(2)^i rounded to a multiple of 8 (16, 24, 32,
    48, 64, 88, 128, ...), up to ``min(max_tokens, cap)``, which is always the last."""
    top = min(int(max_tokens), int(cap))
    if top < 1:
        raise ValueError(f"flashcomm: max_num_batched_tokens must be >= 1, got {max_tokens}")
    out: list[int] = []
    i = 0
    while True:
        n = int(round(start * math.sqrt(2) ** i / 8.0)) * 8
        if n >= top:
            break
        if not out or n > out[-1]:
            out.append(n)
        i += 1
    out.append(top)
    return out


def iterations(n: int, hidden: int, element_size: int) -> int:
    """Boundaries per sample at ``n`` tokens (rank-invariant: shapes only)."""
    per = max(1, n * hidden * element_size)
    return max(1, min(MAX_ITERATIONS, SAMPLE_BYTES // per))


def pick_threshold(tokens: list[int], replicated_s: list[float], sharded_s: list[float],
                   max_tokens: int, margin: float = MARGIN) -> int:
    """:func:`pick_from_ratios` for one representative time per mode and point: the
    ratio at each point is ``sharded / replicated``."""
    if not (len(tokens) == len(replicated_s) == len(sharded_s)) or not tokens:
        raise ValueError("flashcomm: pick_threshold needs one timing per mode and point")
    return pick_from_ratios(tokens, [s / r for r, s in zip(replicated_s, sharded_s)],
                            max_tokens, margin)


def pick_from_ratios(tokens: list[int], ratios: list[float], max_tokens: int,
                     margin: float = MARGIN) -> int:
    """The sp_threshold for sharded/replicated time ratios of one boundary at ``tokens``
    (ascending): sharded runs for ``n > threshold``. Sharded counts as faster at ``n``
    when ``ratio < 1 - margin``; a tie (anything closer to parity) stays replicated. The
    crossover is the smallest ladder point from which sharded is faster at every larger
    point measured; the threshold is where ``ratio - (1 - margin)``, interpolated
    linearly between that point and the one before, crosses zero (``n0 - 1`` when
    sharded is faster from the first point on). Sharded not faster at the last point:
    ``max_tokens`` (no batch is sharded)."""
    if len(tokens) != len(ratios) or not tokens:
        raise ValueError("flashcomm: pick_from_ratios needs one ratio per point")
    diff = [q - (1.0 - margin) for q in ratios]
    k = len(tokens)
    while k > 0 and diff[k - 1] < 0:
        k -= 1
    if k == len(tokens):
        return int(max_tokens)
    if k == 0:
        return max(0, int(tokens[0]) - 1)
    n0, n1, d0, d1 = tokens[k - 1], tokens[k], diff[k - 1], diff[k]
    cross = n0 + (n1 - n0) * d0 / (d0 - d1)  # d0 >= 0 > d1
    return int(min(max(math.floor(cross), n0), n1 - 1))


def paired_ratio(replicated_s: list[float], sharded_s: list[float]) -> float:
    """The decision statistic of one point on one rank: the upper quartile of the
    per-sample ratios ``sharded_i / replicated_i``. Samples are interleaved, so each
    pair saw the same load; the upper quartile makes "sharded is faster" mean "faster
    in at least three samples out of four", so a point at parity, where the ratios
    scatter around 1 with the machine's noise, does not read as a win."""
    if len(replicated_s) != len(sharded_s) or not replicated_s:
        raise ValueError("flashcomm: paired_ratio needs paired samples")
    r = sorted(s / max(rep, 1e-12) for rep, s in zip(replicated_s, sharded_s))
    return r[min(len(r) - 1, math.ceil(0.75 * len(r)) - 1)]


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------

Boundary = Callable[[int, int], Callable[[], None]]


def engine_boundary(hidden: int, dtype: torch.dtype, device: torch.device, group: str,
                    norm_weight: torch.Tensor, eps: float) -> Boundary:
    """The engine form's boundary: ``boundary(n, sp_threshold)`` returns a callable
    running, on ``[n, hidden]`` buffers of ``dtype``, what flashcomm adds after a
    row-parallel GEMM: the GEMM's output written (a copy), ``sp_reduce_``, then
    ``sp_add_rms_norm_`` (``gather=True``) with the model's norm ``norm_weight [hidden]``."""
    def boundary(n: int, threshold: int) -> Callable[[], None]:
        g = torch.Generator(device="cpu").manual_seed(n)
        src = (torch.randn(n, hidden, generator=g) * 0.02).to(device=device, dtype=dtype)
        partial = torch.empty_like(src)
        residual = (torch.randn(n, hidden, generator=g)).to(device=device, dtype=dtype)

        def run() -> None:
            partial.copy_(src)
            torch.ops.flashcomm.sp_reduce_(partial, group, threshold, True)
            torch.ops.flashcomm.sp_add_rms_norm_(partial, residual, norm_weight, eps, group,
                                                 threshold, True, True)
        return run
    return boundary


def _set_threshold(modules: list[Any], threshold: int) -> None:
    for m in modules:
        m._fc_state = dataclasses.replace(m._fc_state, sp_threshold=int(threshold))


def module_boundaries(pairs: list[tuple[Any, Any, Any]], dtype: torch.dtype,
                      device: torch.device) -> Boundary:
    """The flashcomm GEMM form's boundaries, with the model's own converted modules:
    per ``(row, norm, column)``, ``row(x [n, K_r])`` -> ``norm(out, residual)`` ->
    ``column(normed)``; every module switched to the mode's threshold while it runs."""
    modules = [m for trio in pairs for m in trio]

    def boundary(n: int, threshold: int) -> Callable[[], None]:
        g = torch.Generator(device="cpu").manual_seed(n)
        inputs = []
        for row, _norm, _col in pairs:
            k = int(row.fc_weight.shape[1])
            h = int(row.fc_weight.shape[0])
            x = torch.randn(n, k, generator=g).to(device=device, dtype=dtype)
            res = (torch.randn(n, h, generator=g)).to(device=device, dtype=dtype)
            inputs.append((x, res))
        saved = [m._fc_state for m in modules]

        def run() -> None:
            _set_threshold(modules, threshold)
            try:
                for (row, norm, col), (x, res) in zip(pairs, inputs):
                    out = row(x)
                    out = out[0] if isinstance(out, tuple) else out
                    normed, _ = norm(out, res.clone())
                    col(normed)
            finally:
                for m, st in zip(modules, saved):
                    m._fc_state = st
        return run
    return boundary


def _sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on CPU), so a sample times it all."""
    if device.type != "cpu":
        torch.accelerator.synchronize()


@dataclass
class Measurement:
    """Timings of one boundary per mode (seconds, the slowest rank's fastest sample) at
    ``tokens``, the points measured before the budget ran out, and the decision
    statistic at each (:func:`paired_ratio`, the largest over the ranks)."""

    tokens: list[int] = field(default_factory=list)
    replicated_s: list[float] = field(default_factory=list)
    sharded_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    ratios: list[float] = field(default_factory=list)


def measure(boundary: Boundary, tokens: list[int], hidden: int, element_size: int,
            device: torch.device, cpu_group: Any = None, samples: int = SAMPLES,
            budget_s: float = BUDGET_S) -> Measurement:
    """Times ``boundary`` replicated and sharded at each of ``tokens``. Collective over
    ``cpu_group`` (a c10d group on CPU, gloo; None: the default group) and over the group
    the boundary's ops use: every rank must call it with the same arguments."""
    import torch.distributed as dist
    t_start = time.perf_counter()
    out = Measurement()
    for n in tokens:
        reps = iterations(n, hidden, element_size)
        runs = {mode: boundary(n, t) for mode, t in (("replicated", ALWAYS_REPLICATED),
                                                    ("sharded", 0))}
        for run in runs.values():  # warm-up: first touch, transport buffers
            run()
        times: dict[str, list[float]] = {mode: [] for mode in runs}
        for _ in range(samples):
            for mode, run in runs.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                _sync(device)
                times[mode].append((time.perf_counter() - t0) / reps)
        # Times: the fastest sample (other work on the machine only ever adds time).
        # Decision: the paired ratio, the slowest rank's (all-reduce MAX), so a win must
        # hold on every rank.
        local = torch.tensor([min(times["replicated"]), min(times["sharded"]),
                              time.perf_counter() - t_start,
                              paired_ratio(times["replicated"], times["sharded"])],
                             dtype=torch.float64)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=cpu_group)
        out.tokens.append(n)
        out.replicated_s.append(float(local[0]))
        out.sharded_s.append(float(local[1]))
        out.ratios.append(float(local[3]))
        if float(local[2]) > budget_s:
            break  # the same decision on every rank: the all-reduced elapsed time
    out.seconds = time.perf_counter() - t_start
    return out


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------

def cpu_signature() -> str:
    """The CPU model and flags (Linux: /proc/cpuinfo), else the platform's processor."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} | {flags}"


def stable_config_hash(vllm_config: Any) -> str:
    """``vllm_config.compute_hash()`` (vLLM's compile cache key of the configuration)
    with flashcomm's record in ``additional_config`` reduced to what does not depend on
    the threshold: the threshold the calibration picks enters that record afterwards,
    so the key must not see it (or a cached answer would change its own key)."""
    extra = getattr(vllm_config, "additional_config", None)
    section = extra.get(settings.CONFIG_KEY) if isinstance(extra, dict) else None
    record = section.get(settings.RECORD_KEY) if isinstance(section, dict) else None
    if not isinstance(record, dict):
        return str(vllm_config.compute_hash())
    stable = {k: v for k, v in record.items()
              if k not in ("sp_threshold", "sp_threshold_requested", "stand_aside")}
    section[settings.RECORD_KEY] = stable
    try:
        return str(vllm_config.compute_hash())
    finally:
        section[settings.RECORD_KEY] = record


def cache_key(config_hash: str, facts: dict[str, Any]) -> str:
    """sha256 (hex, 32 characters) of the configuration hash and ``facts`` (tp,
    transport, dtype, hidden size, GEMM form, flashcomm version, CPU, ladder, ...)."""
    blob = json.dumps({"config": config_hash, "facts": facts, "version": CACHE_VERSION},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_path(key: str) -> str:
    """Where the answer for ``key`` is kept: under vLLM's cache root."""
    envs = _compat.symbol("envs")
    root = _compat.attribute(envs, "VLLM_CACHE_ROOT")
    return os.path.join(str(root), "flashcomm", "sp_threshold", f"{key}.json")


def read_cache(path: str, key: str) -> Optional[int]:
    """The cached threshold for ``key`` at ``path``; None when absent or unusable."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT \
            or doc.get("version") != CACHE_VERSION or doc.get("key") != key:
        return None
    value = doc.get("sp_threshold")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def write_cache(path: str, key: str, threshold: int, facts: dict[str, Any],
                m: Measurement) -> None:
    """Keeps ``threshold`` for ``key`` at ``path`` (atomically), with what was measured;
    a cache that cannot be written is a warning (the next start measures again)."""
    from flashcomm._atomic_write import write_json_atomic
    doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key,
           "sp_threshold": int(threshold), "facts": facts, "created": time.time(),
           "tokens": m.tokens, "replicated_s": m.replicated_s, "sharded_s": m.sharded_s,
           "paired_ratio": m.ratios, "seconds": round(m.seconds, 3)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, doc, indent=1)
    except OSError as e:
        logger.warning("flashcomm: cannot write the sp_threshold cache %s: %s", path, e)


# ---------------------------------------------------------------------------------------
# Plugin hooks
# ---------------------------------------------------------------------------------------

@dataclass
class _Pending:
    vllm_config: Any
    converted: int
    threshold: int  # kernel threshold
    form: str


def initial_threshold(requested: SpThreshold, tuning_path: Optional[str]) -> tuple[int, str]:
    """Before conversion, in every worker: loads and applies the tuning table
    ``tuning_path`` (its kernel-threshold entries and pipeline config; collective
    settings that ``flashcomm.init`` compares across ranks), and returns the threshold
    to convert with and where it comes from: ``(n, "set")`` for an explicit number,
    ``(table.sp_threshold, "tuning file")`` when the table has one and ``requested`` is
    auto, else ``(DEFAULT_SP_THRESHOLD, "auto")``: that placeholder is replaced by the
    measured value after the weights load (:func:`after_load`), before any forward."""
    table_sp = None
    if tuning_path:
        import flashcomm
        from flashcomm import tuning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", tuning.TuningTableWarning)
            table = tuning.load_and_apply(tuning_path)
        for w in caught:
            logger.warning("%s", w.message)
        if table.pipeline_config:
            flashcomm.set_pipeline_config(*table.pipeline_config)
        table_sp = table.sp_threshold
        logger.debug("flashcomm: tuning table %s: %d entries, sp_threshold %s",
                     tuning_path, len(table.entries), table_sp)
    if requested != AUTO:
        return int(requested), "set"
    if table_sp is not None:
        return int(table_sp), "tuning file"
    from flashcomm import DEFAULT_SP_THRESHOLD
    return DEFAULT_SP_THRESHOLD, AUTO


def defer(model: Any, vllm_config: Any, converted: int, threshold: int) -> None:
    """Marks ``model`` (just converted with a placeholder threshold) for calibration
    once its weights have loaded (:func:`after_load`)."""
    record = settings.conversion_record(getattr(vllm_config, "additional_config", None))
    model.__dict__["_fc_calibration"] = _Pending(vllm_config, converted, threshold,
                                                 str(record.get("gemm", "flashcomm")))


def pending(model: Any) -> bool:
    """Whether ``model`` waits for :func:`after_load` (marked by :func:`defer`)."""
    return isinstance(getattr(model, "__dict__", {}).get("_fc_calibration"), _Pending)


def _converted_modules(model: Any) -> list[Any]:
    return [m for m in model.modules() if getattr(m, "_fc_state", None) is not None]


def _boundary_for(model: Any, form: str, group: str) -> tuple[Boundary, int, torch.dtype,
                                                              torch.device]:
    """The boundary to time for ``model`` in GEMM ``form``; (boundary, hidden, dtype,
    device)."""
    inner = model.model
    layers = list(inner.layers)
    first = layers[0]
    norm = first.post_attention_layernorm
    weight = norm.weight.data
    hidden = int(weight.shape[0])
    dtype, device = weight.dtype, weight.device  # the model's activation dtype
    if form == "engine":
        return (engine_boundary(hidden, dtype, device, group, weight, norm.variance_epsilon),
                hidden, dtype, device)
    nxt = layers[1] if len(layers) > 1 else first
    pairs = [(first.self_attn.o_proj, first.post_attention_layernorm, first.mlp.gate_up_proj),
             (first.mlp.down_proj, nxt.input_layernorm, nxt.self_attn.qkv_proj)]
    return module_boundaries(pairs, dtype, device), hidden, dtype, device


def calibrate(model: Any, vllm_config: Any, form: str) -> tuple[int, str]:
    """Measures (or reads from the cache) this model's sp_threshold; collective over the
    TP group. Returns (threshold, how) with ``how`` "measured in X s" / "cached"."""
    import torch.distributed as dist

    import flashcomm
    tp = _compat.symbol("get_tp_group")()
    gname = tp.device_group.group_name
    max_tokens = int(_compat.attribute(_compat.attribute(vllm_config, "scheduler_config"),
                                       "max_num_batched_tokens"))
    if tp.world_size == 1:
        return max_tokens, "tp=1: never sharded"
    boundary, hidden, dtype, device = _boundary_for(model, form, gname)
    tokens = ladder(max_tokens)
    envs = _compat.symbol("envs")
    facts = {"tp": tp.world_size, "transport": flashcomm.transport(gname),
             "all_reduce": flashcomm.all_reduce_provider(gname), "dtype": str(dtype),
             "hidden": hidden, "form": form, "flashcomm": flashcomm.__version__,
             "cpu": cpu_signature(), "cpu_features": flashcomm.cpu_features(),
             "device": str(device.type), "ladder": tokens, "samples": SAMPLES,
             "margin": MARGIN, "budget_s": BUDGET_S,
             "vllm_env": hashlib.sha256(json.dumps(
                 _compat.attribute(envs, "compile_factors")(), sort_keys=True,
                 default=str).encode()).hexdigest()}
    key = cache_key(stable_config_hash(vllm_config), facts)
    path = cache_path(key)
    # Rank 0 reads the cache and tells the others: every rank agrees on hit or miss.
    got = torch.tensor([-1], dtype=torch.int64)
    if tp.rank_in_group == 0:
        cached = read_cache(path, key)
        got[0] = -1 if cached is None else cached
    dist.broadcast(got, src=tp.ranks[0], group=tp.cpu_group)
    if int(got[0]) >= 0:
        return int(got[0]), "cached"
    m = measure(boundary, tokens, hidden, torch.empty((), dtype=dtype).element_size(),
                device, cpu_group=tp.cpu_group)
    threshold = pick_from_ratios(m.tokens, m.ratios, max_tokens)
    logger.debug("flashcomm: sp_threshold calibration (%s form): tokens %s, replicated "
                 "%s us, sharded %s us, paired ratio %s -> %d", form, m.tokens,
                 [round(t * 1e6, 1) for t in m.replicated_s],
                 [round(t * 1e6, 1) for t in m.sharded_s],
                 [round(q, 3) for q in m.ratios], threshold)
    if tp.rank_in_group == 0:
        write_cache(path, key, threshold, facts, m)
    return threshold, f"measured in {m.seconds:.1f} s"


def apply_threshold(model: Any, vllm_config: Any, threshold: int, requested: str) -> int:
    """Switches every converted module of ``model`` to ``threshold`` (raised above
    vLLM's CUDA-graph capture sizes, ``layers.effective_sp_threshold``), makes the
    ranks agree on it again (``flashcomm.init``, a collective) and records it in
    ``additional_config["flashcomm"]`` (vLLM's compile cache key) with
    ``sp_threshold_requested=requested``. Returns the effective threshold."""
    import flashcomm

    from . import layers
    effective = layers.effective_sp_threshold(vllm_config, int(threshold))
    modules = _converted_modules(model)
    _set_threshold(modules, effective)
    groups = {m._fc_state.group_name: m._fc_state.threshold for m in modules}
    for gname, kthr in sorted(groups.items()):
        flashcomm.init(gname, sp_threshold=effective, threshold=int(kthr), enabled=True)
    record = settings.conversion_record(vllm_config.additional_config)
    record.update({"sp_threshold": int(effective), "sp_threshold_requested": requested})
    layers.record_conversion(vllm_config, record)
    return effective


def stand_aside_reason(form: str, threshold: int, max_tokens: int,
                       vllm_all_reduce: str) -> Optional[str]:
    """Why the converted layers should run vLLM's own forward, or None. Only when the
    measured threshold shards no batch (``threshold >= max_tokens``), in the engine form
    (the GEMMs are vLLM's either way, so flashcomm would change only the replicated
    all-reduce and the add + RMSNorm), and vLLM's own all-reduce for the group is its
    CPU shared-memory one: there flashcomm's replicated path is a custom-op call per
    boundary that Inductor cannot fuse, measured 0.97-1.06x vLLM's decode step under
    serving load (BENCHMARKS.md, "Serving load"): no gain to be had. Where vLLM all-reduces over gloo (its AVX2 build), flashcomm's shared-memory
    transport is the gain, and the layers stay converted. Rank-invariant: the threshold
    is agreed, the form and vLLM's communicator are the same build on every rank."""
    if form != "engine" or threshold < max_tokens or vllm_all_reduce != "cpu-shm":
        return None
    return ("no batch is sharded and vLLM's own shared-memory all-reduce serves the "
            "replicated path: the converted layers run vLLM's own forward")


def stand_aside(model: Any, vllm_config: Any) -> int:
    """Marks every converted module of ``model`` to run vLLM's own forward and records
    it (vLLM's compile cache key: the traced graph differs). Returns how many."""
    from . import layers
    modules = _converted_modules(model)
    for m in modules:
        m._fc_state = dataclasses.replace(m._fc_state, stand_aside=True)
    record = settings.conversion_record(vllm_config.additional_config)
    record["stand_aside"] = True
    layers.record_conversion(vllm_config, record)
    return len(modules)


def after_load(model: Any) -> Optional[tuple[int, str]]:
    """The plugin's hook after vLLM's loader returns ``model`` (weights loaded, before
    any forward): for a model :func:`defer` marked, measures or reads the threshold,
    applies it and returns (effective threshold, how it was obtained); None otherwise."""
    p = model.__dict__.pop("_fc_calibration", None) if hasattr(model, "__dict__") else None
    if not isinstance(p, _Pending):
        return None
    t0 = time.perf_counter()
    with torch.inference_mode():
        threshold, how = calibrate(model, p.vllm_config, p.form)
    effective = apply_threshold(model, p.vllm_config, threshold, AUTO)
    from .standalone import vllm_tp_transport
    max_tokens = int(_compat.attribute(_compat.attribute(p.vllm_config, "scheduler_config"),
                                       "max_num_batched_tokens"))
    reason = stand_aside_reason(p.form, effective, max_tokens, vllm_tp_transport())
    if reason is not None:
        stand_aside(model, p.vllm_config)
        how = f"{how}; {reason}"
    logger.debug("flashcomm: sp_threshold auto -> %d (%s; %.2f s)", effective, how,
                 time.perf_counter() - t0)
    return effective, how
