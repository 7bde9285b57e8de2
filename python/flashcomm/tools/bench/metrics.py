"""What the benchmarks derive from the timings: per-point ratios, the policy's choice
against the faster fixed strategy, crossovers, and the summary per op."""

from __future__ import annotations

import statistics
from typing import Any, Optional, Sequence

import torch

from flashcomm import tuning

# The variant of build_op_case that runs each kernel strategy (forced).
STRATEGY_VARIANTS = {"sequential": "seq", "pipelined": "pipe"}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def crossover(ns: Sequence[int], seq_ms: Sequence[float], pipe_ms: Sequence[float],
              margin: float = 0.0) -> int:
    """Threshold from measurements on an increasing grid: pipelined iff n > threshold.
    The smallest grid point from which pipelined wins (is faster by more than
    ``margin``, a fraction) at every larger measured n; the threshold is the grid
    point before it (0 if pipelined wins everywhere, :data:`flashcomm.tuning.NEVER` if
    it does not win at the largest n)."""
    wins = [p < s * (1.0 - margin) for s, p in zip(seq_ms, pipe_ms)]
    first = len(ns)
    for i in range(len(ns) - 1, -1, -1):
        if not wins[i]:
            break
        first = i
    if first == len(ns):
        return tuning.NEVER
    return 0 if first == 0 else int(ns[first - 1])


def op_row(op: str, K: int, N: int, n: int, tp: int, med: dict[str, float],
           auto_threshold: int) -> dict[str, Any]:
    """One op-level point: the medians (``<variant>_ms``) and what they say.
    ``auto_threshold`` is what the op resolves ``threshold=-1`` to on the ranks."""
    best = min(med["seq"], med["pipe"])
    comm = med["comm"]
    row: dict[str, Any] = {"op": op, "K": K, "N": N, "n": n, "tp": tp,
                           **{f"{k}_ms": v for k, v in med.items()}}
    row["overlap_efficiency"] = ratio(med["gemm"] + comm - med["pipe"], min(med["gemm"], comm))
    row["seq_overhead_ms"] = med["seq"] - med["py"]
    row["seq_vs_py"] = ratio(med["seq"], med["py"])
    row["pipe_vs_seq"] = ratio(med["pipe"], med["seq"])
    row["best_fixed"] = "seq" if med["seq"] <= med["pipe"] else "pipe"
    row["auto_vs_best"] = ratio(med["auto"], best)
    row["auto_threshold"] = auto_threshold
    strategy = str(torch.ops.flashcomm.strategy(n, tp, auto_threshold, True))
    row["auto_strategy"] = STRATEGY_VARIANTS[strategy]
    # The policy's cost: the fixed strategy auto resolves to, against the faster fixed
    # strategy, both from the fixed-strategy timings (1.0 when auto picks the faster).
    row["choice_vs_best"] = ratio(med[row["auto_strategy"]], best)
    # auto vs the fixed strategy it resolves to: the same code path, so this is noise
    row["auto_vs_same"] = ratio(med["auto"], med[row["auto_strategy"]])
    if "tp_ar_ms" in row:
        row["best_vs_tp_ar"] = ratio(best, med["tp_ar"])
    return row


def w8a8_bytes_row(n: int, K: int, tp: int, dtype: str) -> dict[str, Any]:
    """Bytes the W8A8 all-gather moves (int8 rows + one fp32 scale per token, one
    message) against the same rows in bf16 and in ``dtype``."""
    c = int(torch.ops.flashcomm.shard_rows(n, tp))
    fp_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    w8 = tp * c * (K + 4)
    return {"n": n, "K": K, "w8a8_bytes": w8, "bf16_bytes": tp * c * K * 2,
            f"{dtype}_bytes": tp * c * K * fp_bytes, "w8a8_vs_bf16": w8 / (tp * c * K * 2)}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per op: overlap, small-n overhead, crossover and how auto did; plus the GEMM,
    chunking, byte and model headlines."""
    s: dict[str, Any] = {}
    ops = result["ops"]
    for op in sorted({r["op"] for r in ops}):
        rows = [r for r in ops if r["op"] == op]
        big = [r for r in rows if r["n"] >= 1024]
        small = [r for r in rows if r["n"] <= 16]
        s[op] = {
            "max_overlap_efficiency": max((r["overlap_efficiency"] for r in big), default=None),
            "overlap_efficiency_at_max_n": rows[-1]["overlap_efficiency"],
            "best_pipe_vs_seq": min(r["pipe_vs_seq"] for r in rows),
            "small_n_overhead_ms": statistics.median([r["seq_overhead_ms"] for r in small])
            if small else None,
            "seq_crossover": crossover([r["n"] for r in rows], [r["seq_ms"] for r in rows],
                                       [r["pipe_ms"] for r in rows]),
            "worst_auto_vs_best": max(r["auto_vs_best"] for r in rows),
            "auto_within_5pct_at": sum(r["auto_vs_best"] <= 1.05 for r in rows),
            "auto_picks_best_at": sum(r["auto_strategy"] == r["best_fixed"] for r in rows),
            "worst_choice_vs_best": max(r["choice_vs_best"] for r in rows),
            "choice_within_5pct_at": sum(r["choice_vs_best"] <= 1.05 for r in rows),
            "noise_auto_vs_same_max": max(abs(r["auto_vs_same"] - 1) for r in rows),
            "points": len(rows),
        }
    if result["gemm"]:
        g = result["gemm"]
        s["gemm_int8_speedup_vs_fp32_at_max_n"] = g[-1]["int8_speedup_vs_fp32"]
        s["gemm_int8_speedup_vs_bf16_at_max_n"] = g[-1]["int8_speedup_vs_bf16"]
    if result["chunks"]:
        s["chunk_gemm_efficiency_at_max_n"] = {k: v for k, v in result["chunks"][-1].items()
                                               if k.endswith("_efficiency")}
    if result["w8a8_bytes"]:
        s["w8a8_ag_bytes_vs_bf16"] = result["w8a8_bytes"][-1]["w8a8_vs_bf16"]
    if result["model"]:
        s["model_crossover_n"] = result.get("model_crossover")
    return s


def repeats_at(repeats: int, n: int) -> int:
    """Cheap points (n <= 512) get 4x the repeats: their noise is relatively larger."""
    return repeats * 4 if n <= 512 else repeats


def fmt_threshold(v: Optional[int]) -> str:
    return "never" if v is not None and v >= tuning.NEVER else str(v)
