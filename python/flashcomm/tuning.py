"""Tuning tables: measured crossovers instead of a constant, loaded at serving time.

The compact ops called with ``threshold < 0`` (auto) look up a crossover per op
shape ``(op, K, N, tp, dtype)`` in a C++ table (``torch.ops.flashcomm.
set_auto_threshold``), else use the library's default. This module is that table's
format and its use; measuring one is a tool (``flashcomm tune``,
:mod:`flashcomm.tools.bench.tune`):

* :func:`save_table` writes a table atomically with a content hash;
* :func:`load_table` validates format, version and hash: a corrupt or
  foreign-version table gives a :class:`TuningTableWarning` and the defaults (an
  empty table: every auto op uses the default threshold);
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
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from . import _loader
from ._atomic_write import write_json_atomic

_loader.load()

TABLE_FORMAT = "flashcomm-tuning"
TABLE_VERSION = 1
# The compact ops: the ops with a kernel strategy, hence with tuning-table entries.
OPS = ("gemm_rs", "ag_gemm", "gemm_rs_w8a8", "ag_gemm_w8a8")
DTYPES = ("float32", "bfloat16", "float16", "int8")
# A threshold no token count exceeds: "always sequential" (stored when pipelining never
# won on the measured grid).
NEVER = 2**62


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
    auto op uses the default threshold and the model keeps its own sp_threshold."""
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
    """Writes ``table`` to ``path`` atomically (a reader never sees a partial table).
    Returns the content hash."""
    data = table_to_json(table)
    write_json_atomic(path, data, indent=1, sort_keys=True)
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


def format_table(table: TuningTable) -> str:
    """The table as text: one line per entry, then sp_threshold, pipeline config and
    fingerprint."""
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


__all__ = ["DTYPES", "NEVER", "OPS", "TABLE_FORMAT", "TABLE_VERSION", "TuningEntry",
           "TuningTable", "TuningTableWarning", "apply_table", "default_table", "format_table",
           "load_and_apply", "load_table", "save_table", "table_fingerprint", "table_from_json",
           "table_to_json"]
