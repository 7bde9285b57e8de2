"""Thresholds measured on this machine instead of a constant (`flashcomm tune`).

The compact ops called with ``threshold < 0`` (auto) look up a crossover per op
shape ``(op, K, N, tp, dtype)`` in a C++ table (``torch.ops.flashcomm.
set_auto_threshold``), else use 1000. This module measures those crossovers on
the current machine and group, stores them in a versioned JSON table and
registers them:

* :func:`run_tune` measures, for every compact-op shape of a model config, the
  sequential and the pipelined strategy over a grid of token counts on ``tp``
  spawned ranks (gloo), and the model-level ``sp_threshold`` (the compiled
  reference model forced sharded vs forced replicated);
* :func:`save_table` writes the table atomically (temporary file + ``os.replace``)
  with a content hash;
* :func:`load_table` validates format, version and hash: a corrupt or
  foreign-version table gives a :class:`TuningTableWarning` and the defaults (an
  empty table: every auto op uses 1000);
* :func:`apply_table` registers the entries; :func:`load_and_apply` does both;
* :func:`table_fingerprint` is the hash of the decision-relevant content, for
  the start-up rank-agreement check (every rank must load the same table).

Key convention (as the C++ ops build it): ``K = x.size(1)``, ``N = weight.size(0)``,
i.e. per-rank shapes: ``gemm_rs`` K = K_r (this rank's input features), N = full
output features; ``ag_gemm`` K = full input features, N = N_r (this rank's output
features). ``dtype`` is ``"float32"``/``"bfloat16"``/``"float16"`` for the FP ops
and ``"int8"`` for the W8A8 ops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

from . import _loader

_loader.load()

logger = logging.getLogger(__name__)

TABLE_FORMAT = "flashcomm-tuning"
TABLE_VERSION = 1
OPS = ("gemm_rs", "ag_gemm", "gemm_rs_w8a8", "ag_gemm_w8a8")
DTYPES = ("float32", "bfloat16", "float16", "int8")
# Stored when pipelining never won on the measured grid: "always sequential".
NEVER = 2**62
DEFAULT_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


class TuningTableWarning(UserWarning):
    """A tuning table could not be used (corrupt, foreign version, bad hash)."""


@dataclass(frozen=True)
class TuningEntry:
    """Crossover of one op shape: pipelined iff ``n > threshold``."""

    op: str
    k: int
    n: int
    tp: int
    dtype: str
    threshold: int

    def key(self) -> tuple[str, int, int, int, str]:
        return (self.op, self.k, self.n, self.tp, self.dtype)


@dataclass
class TuningTable:
    """A tuning table. ``entries`` and ``sp_threshold`` steer decisions (and are
    hashed); the rest describes where and how they were measured."""

    entries: list[TuningEntry] = field(default_factory=list)
    sp_threshold: Optional[int] = None  # model-level; None = not tuned (use the default)
    pipeline_config: Optional[tuple[int, int]] = None  # (max_chunks, min_chunk_rows) measured with
    machine: dict[str, Any] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""
    source: str = "defaults"  # "defaults", "tuned" or the path it was loaded from

    def threshold_for(self, op: str, k: int, n: int, tp: int, dtype: str) -> Optional[int]:
        for e in self.entries:
            if e.key() == (op, k, n, tp, dtype):
                return e.threshold
        return None


def default_table() -> TuningTable:
    """The table used when none (or an unusable one) is loaded: no entries, so every
    auto op uses the built-in 1000 and the model keeps its own sp_threshold."""
    return TuningTable()


def _decision_content(table: TuningTable) -> dict[str, Any]:
    entries = sorted((asdict(e) for e in table.entries),
                     key=lambda d: (d["op"], d["k"], d["n"], d["tp"], d["dtype"]))
    return {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "entries": entries,
        "sp_threshold": table.sp_threshold,
        "pipeline_config": list(table.pipeline_config) if table.pipeline_config else None,
    }


def table_fingerprint(table: TuningTable) -> str:
    """sha256 (hex) of the table's decision-relevant content: entries (order
    independent), sp_threshold and pipeline config; not the machine description or
    raw measurements. Equal fingerprints = equal decisions on every rank."""
    blob = json.dumps(_decision_content(table), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def table_to_json(table: TuningTable) -> dict[str, Any]:
    out = _decision_content(table)
    out.update({
        "content_hash": table_fingerprint(table),
        "created": table.created,
        "machine": table.machine,
        "measurements": table.measurements,
    })
    return out


def save_table(table: TuningTable, path: str) -> str:
    """Writes ``table`` to ``path`` atomically: a temporary file in the same folder,
    flushed and fsynced, then ``os.replace``; a reader never sees a partial table.
    Returns the content hash."""
    data = table_to_json(table)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".flashcomm-tuning-", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give a normal file's mode
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return data["content_hash"]


def _check_int(d: dict, name: str, lo: int = 0) -> int:
    v = d.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"field {name!r} must be an integer >= {lo}, got {v!r}")
    return v


def table_from_json(data: Any) -> TuningTable:
    """Parses and validates a table; raises ValueError on anything unexpected."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("format") != TABLE_FORMAT:
        raise ValueError(f"format is {data.get('format')!r}, expected {TABLE_FORMAT!r}")
    if data.get("version") != TABLE_VERSION:
        raise ValueError(f"version {data.get('version')!r}, this flashcomm reads version "
                         f"{TABLE_VERSION}")
    raw = data.get("entries")
    if not isinstance(raw, list):
        raise ValueError("'entries' must be a list")
    entries, seen = [], set()
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise ValueError(f"entry {i} is not an object")
        if e.get("op") not in OPS:
            raise ValueError(f"entry {i}: op {e.get('op')!r} not one of {OPS}")
        if e.get("dtype") not in DTYPES:
            raise ValueError(f"entry {i}: dtype {e.get('dtype')!r} not one of {DTYPES}")
        entry = TuningEntry(op=e["op"], k=_check_int(e, "k", 1), n=_check_int(e, "n", 1),
                            tp=_check_int(e, "tp", 1), dtype=e["dtype"],
                            threshold=_check_int(e, "threshold", 0))
        if entry.key() in seen:
            raise ValueError(f"entry {i}: duplicate key {entry.key()}")
        seen.add(entry.key())
        entries.append(entry)
    sp = data.get("sp_threshold")
    if sp is not None:
        sp = _check_int(data, "sp_threshold", 0)
    pc = data.get("pipeline_config")
    if pc is not None:
        if (not isinstance(pc, list) or len(pc) != 2
                or not all(isinstance(v, int) and v >= 1 for v in pc)):
            raise ValueError(f"pipeline_config must be [max_chunks, min_chunk_rows], got {pc!r}")
        pc = (pc[0], pc[1])
    table = TuningTable(entries=entries, sp_threshold=sp, pipeline_config=pc,
                        machine=data.get("machine") or {},
                        measurements=data.get("measurements") or [],
                        created=str(data.get("created", "")))
    want = data.get("content_hash")
    got = table_fingerprint(table)
    if want != got:
        raise ValueError(f"content hash mismatch (stored {want!r}, computed {got!r})")
    return table


def load_table(path: str) -> TuningTable:
    """Reads and validates a table. A missing, unreadable, corrupt or foreign-version
    table is not fatal: a :class:`TuningTableWarning` names the problem and the
    defaults (:func:`default_table`) are returned."""
    try:
        with open(path) as f:
            data = json.load(f)
        table = table_from_json(data)
    except (OSError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"flashcomm: ignoring tuning table {path!r} ({e}); using the default "
                      f"thresholds", TuningTableWarning, stacklevel=2)
        return default_table()
    table.source = path
    return table


def apply_table(table: TuningTable, clear: bool = True) -> int:
    """Registers the table's crossovers for auto ops (``threshold < 0``) in this
    process; ``clear`` first drops earlier registrations. The pipeline config and
    sp_threshold are not applied here (they belong to the caller's set-up; see
    ``table.pipeline_config`` / ``table.sp_threshold``). Must run identically on
    every rank. Returns the number of entries registered."""
    if clear:
        torch.ops.flashcomm.clear_auto_thresholds()
    for e in table.entries:
        torch.ops.flashcomm.set_auto_threshold(e.op, e.k, e.n, e.tp, e.dtype, e.threshold)
    return len(table.entries)


def load_and_apply(path: str, clear: bool = True) -> TuningTable:
    """:func:`load_table` then :func:`apply_table`; returns the table in force."""
    table = load_table(path)
    apply_table(table, clear=clear)
    return table


# --- what to tune ---------------------------------------------------------------

def model_op_shapes(cfg, tp: int, dtype: str = "float32",
                    w8a8: bool = False) -> list[tuple[str, str, int, int, str]]:
    """Compact-op shapes of the reference decoder's sequence-parallel layers as table
    keys: ``[(layer, op, K, N, dtype_key)]`` (per-rank K/N as the ops key them).
    The LM head runs with ``enabled=False`` and has no entry."""
    q_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    H, inter = cfg.hidden_size, cfg.intermediate_size
    ag, rs = ("ag_gemm_w8a8", "gemm_rs_w8a8") if w8a8 else ("ag_gemm", "gemm_rs")
    key = "int8" if w8a8 else dtype
    shapes = [
        ("qkv", ag, H, q_out // tp, key),
        ("o_proj", rs, cfg.num_heads * cfg.head_dim // tp, H, key),
        ("gate_up", ag, H, 2 * inter // tp, key),
        ("down", rs, inter // tp, H, key),
    ]
    out, seen = [], set()
    for s in shapes:  # layers sharing an op shape share one entry
        if s[1:] not in seen:
            seen.add(s[1:])
            out.append(s)
    return out


def crossover(ns: Sequence[int], seq_ms: Sequence[float], pipe_ms: Sequence[float],
              margin: float = 0.0) -> int:
    """Threshold from measurements on an increasing grid: pipelined iff n > threshold.
    The smallest grid point from which pipelined wins (is faster by more than
    ``margin``, a fraction) at every larger measured n; the threshold is the grid
    point before it (0 if pipelined wins everywhere, :data:`NEVER` if it never wins
    at the largest n)."""
    wins = [p < s * (1.0 - margin) for s, p in zip(seq_ms, pipe_ms)]
    first = len(ns)
    for i in range(len(ns) - 1, -1, -1):
        if not wins[i]:
            break
        first = i
    if first == len(ns):
        return NEVER
    return 0 if first == 0 else int(ns[first - 1])


@dataclass
class TuneConfig:
    tp: int = 2
    model: Any = None  # ModelConfig; None = flashcomm.model_demo.DEMO_MODEL
    dtype: str = "float32"
    w8a8: bool = True  # also tune the W8A8 ops' shapes
    fp: bool = True  # tune the FP ops' shapes
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    model_tokens: tuple[int, ...] = (256, 512, 1024, 2048)
    tune_model: bool = True  # also the model-level sp_threshold
    warmup: int = 1
    repeats: int = 3
    threads_per_rank: Optional[int] = None
    margin: float = 0.0
    backend: str = "aot_eager"


def _progress(done: int, total: int, what: str, stream=None) -> None:
    stream = stream or sys.stderr
    width = 30
    filled = width * done // max(total, 1)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<40.40}")
    if done >= total:
        stream.write("\n")
    stream.flush()


def run_tune(cfg: TuneConfig, progress: bool = True) -> TuningTable:
    """Measures the crossovers on ``cfg.tp`` spawned CPU ranks (gloo) and returns the
    table (not yet saved or applied). Timings: per-repeat maximum over ranks,
    median over repeats, sequential and pipelined measured side by side."""
    from . import bench
    from .model_demo import DEMO_MODEL
    from .testing import RankPool

    model = cfg.model or DEMO_MODEL
    model.check_tp(cfg.tp)
    shapes = []
    if cfg.fp:
        shapes += model_op_shapes(model, cfg.tp, cfg.dtype, False)
    if cfg.w8a8:
        shapes += model_op_shapes(model, cfg.tp, cfg.dtype, True)
    ns = sorted(set(cfg.tokens))
    total = len(shapes) * len(ns) + (len(cfg.model_tokens) + 1 if cfg.tune_model else 0)
    done = 0
    entries, measurements = [], []
    report = (lambda d, w: _progress(d, total, w)) if progress else (lambda d, w: None)
    with RankPool(cfg.tp, timeout_s=900, threads_per_rank=cfg.threads_per_rank) as pool:
        machine = bench.machine_info(pool)
        pipeline_config = tuple(pool.run(bench.get_pipeline_config_on_rank)[0])
        for layer, op, K, N, key in shapes:
            seq, pipe = [], []
            for n in ns:
                report(done, f"{op} K={K} N={N} n={n}")
                med = bench.measure_op(pool, op, K, N, n, cfg.dtype, ("seq", "pipe"),
                                       cfg.warmup, cfg.repeats)
                seq.append(med["seq"])
                pipe.append(med["pipe"])
                done += 1
            thr = crossover(ns, seq, pipe, cfg.margin)
            entries.append(TuningEntry(op, K, N, cfg.tp, key, thr))
            measurements.append({"layer": layer, "op": op, "k": K, "n": N, "dtype": key,
                                 "tokens": ns, "sequential_ms": seq, "pipelined_ms": pipe,
                                 "threshold": thr})
        sp_threshold = None
        if cfg.tune_model:
            table = TuningTable(entries=entries)
            report(done, "model: compiling")
            mns = sorted(set(cfg.model_tokens))
            pool.run(bench.model_setup_on_rank, model, cfg.dtype, False, ("sharded", "replicated"),
                     cfg.backend, _entries_json(table), None)
            done += 1
            sharded, replicated = [], []
            for n in mns:
                report(done, f"model n={n}")
                med = bench.measure_model(pool, n, cfg.warmup, cfg.repeats)
                sharded.append(med["sharded"])
                replicated.append(med["replicated"])
                done += 1
            sp_threshold = crossover(mns, replicated, sharded, cfg.margin)
            measurements.append({"layer": "model", "tokens": mns, "replicated_ms": replicated,
                                 "sharded_ms": sharded, "sp_threshold": sp_threshold})
        report(total, "done")
    return TuningTable(entries=entries, sp_threshold=sp_threshold,
                       pipeline_config=pipeline_config, machine=machine,
                       measurements=measurements,
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), source="tuned")


def _entries_json(table: TuningTable) -> dict[str, Any]:
    return table_to_json(table)


def format_table(table: TuningTable) -> str:
    lines = [f"{'op':<14}{'K':>6}{'N':>6}{'tp':>4}  {'dtype':<9}{'threshold':>12}"]
    for e in table.entries:
        thr = "never" if e.threshold >= NEVER else str(e.threshold)
        lines.append(f"{e.op:<14}{e.k:>6}{e.n:>6}{e.tp:>4}  {e.dtype:<9}{thr:>12}")
    sp = table.sp_threshold
    sp_text = "not tuned" if sp is None else ("never" if sp >= NEVER else sp)
    lines.append(f"model sp_threshold: {sp_text}")
    if table.pipeline_config:
        lines.append(f"pipeline config (max_chunks, min_chunk_rows): {table.pipeline_config}")
    lines.append(f"fingerprint: {table_fingerprint(table)}")
    return "\n".join(lines)


__all__ = ["NEVER", "TABLE_FORMAT", "TABLE_VERSION", "TuneConfig", "TuningEntry", "TuningTable",
           "TuningTableWarning", "apply_table", "crossover", "default_table", "format_table",
           "load_and_apply", "load_table", "model_op_shapes", "run_tune", "save_table",
           "table_fingerprint", "table_from_json", "table_to_json"]
