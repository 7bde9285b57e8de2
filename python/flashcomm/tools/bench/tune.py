"""`flashcomm tune`: measures the crossovers of a model's op shapes on this machine and
group, and returns them as a :class:`flashcomm.tuning.TuningTable` (saving, loading and
applying tables is the library's, :mod:`flashcomm.tuning`).

* :func:`run_tune` measures, for every compact-op shape of a model config, the
  sequential and the pipelined strategy over a grid of token counts on ``tp`` spawned
  ranks (gloo), and the model-level ``sp_threshold`` (the compiled reference model forced
  sharded vs forced replicated); :func:`~flashcomm.tools.bench.metrics.crossover` turns
  each pair of series into a threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from flashcomm.tools.models import DEMO_MODEL, ModelConfig
from flashcomm.tools.testing import RankPool
from flashcomm.tuning import TuningEntry, TuningTable, table_to_json

from . import cases, timing
from .metrics import crossover

DEFAULT_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def model_op_shapes(cfg: ModelConfig, tp: int, dtype: str = "float32",
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


@dataclass
class TuneConfig:
    tp: int = 2
    model: Optional[ModelConfig] = None  # None = DEMO_MODEL
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


def run_tune(cfg: TuneConfig, progress: bool = True) -> TuningTable:
    """Measures the crossovers on ``cfg.tp`` spawned CPU ranks (gloo) and returns the
    table (not yet saved or applied). Timings: per-repeat maximum over ranks,
    median over repeats, sequential and pipelined measured side by side."""
    model = cfg.model or DEMO_MODEL
    model.check_tp(cfg.tp)
    shapes = []
    if cfg.fp:
        shapes += model_op_shapes(model, cfg.tp, cfg.dtype, False)
    if cfg.w8a8:
        shapes += model_op_shapes(model, cfg.tp, cfg.dtype, True)
    ns = sorted(set(cfg.tokens))
    total = len(shapes) * len(ns) + (len(cfg.model_tokens) + 1 if cfg.tune_model else 0)
    entries, measurements = [], []
    with RankPool(cfg.tp, timeout_s=900, threads_per_rank=cfg.threads_per_rank) as pool, \
            tqdm(total=total, disable=not progress, unit="point") as bar:
        machine = timing.machine_info(pool)
        pipeline_config = tuple(pool.run(cases.pipeline_config_on_rank)[0])
        for layer, op, K, N, key in shapes:
            seq, pipe = [], []
            for n in ns:
                bar.set_description(f"{op} K={K} N={N} n={n}")
                med = timing.measure_op(pool, op, K, N, n, cfg.dtype, ("seq", "pipe"),
                                        cfg.warmup, cfg.repeats)
                seq.append(med["seq"])
                pipe.append(med["pipe"])
                bar.update()
            thr = crossover(ns, seq, pipe, cfg.margin)
            entries.append(TuningEntry(op, K, N, cfg.tp, key, thr))
            measurements.append({"layer": layer, "op": op, "k": K, "n": N, "dtype": key,
                                 "tokens": ns, "sequential_ms": seq, "pipelined_ms": pipe,
                                 "threshold": thr})
        sp_threshold = None
        if cfg.tune_model:
            bar.set_description("model: compiling")
            mns = sorted(set(cfg.model_tokens))
            # The op entries measured above steer the model's auto kernel threshold.
            pool.run(cases.model_setup_on_rank, model, cfg.dtype, False,
                     ("sharded", "replicated"), cfg.backend,
                     table_to_json(TuningTable(entries=entries)), None)
            bar.update()
            sharded, replicated = [], []
            for n in mns:
                bar.set_description(f"model n={n}")
                med = timing.measure_model(pool, n, cfg.warmup, cfg.repeats)
                sharded.append(med["sharded"])
                replicated.append(med["replicated"])
                bar.update()
            sp_threshold = crossover(mns, replicated, sharded, cfg.margin)
            measurements.append({"layer": "model", "tokens": mns, "replicated_ms": replicated,
                                 "sharded_ms": sharded, "sp_threshold": sp_threshold})
        bar.set_description("done")
    return TuningTable(entries=entries, sp_threshold=sp_threshold,
                       pipeline_config=pipeline_config, machine=machine,
                       measurements=measurements,
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), source="tuned")


__all__ = ["DEFAULT_TOKENS", "TuneConfig", "model_op_shapes", "run_tune"]
