"""`flashcomm bench`: the order of the runs and the result document."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from tqdm import tqdm

import flashcomm
from flashcomm import tuning
from flashcomm.tools.models import DEMO_MODEL, ModelConfig
from flashcomm.tools.testing import RankPool

from . import cases, metrics, timing

DEFAULT_TOKENS = (1, 16, 128, 512, 1024, 2048, 4096, 8192)
DEFAULT_MODEL_TOKENS = (1, 64, 256, 1024, 2048, 4096)
GEMM_VARIANTS = ("fp32", "bf16", "int8", "w8a8")
MODEL_VARIANTS = ("sharded", "replicated", "flashcomm", "tp")


@dataclass
class BenchConfig:
    tp: int = 2
    model: Optional[ModelConfig] = None  # None = DEMO_MODEL
    dtype: str = "float32"
    ops: tuple[str, ...] = tuning.OPS
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    model_tokens: tuple[int, ...] = DEFAULT_MODEL_TOKENS
    run_model: bool = True
    run_gemm: bool = True
    run_chunks: bool = True
    pipe_sweep: tuple[tuple[int, int], ...] = ()
    chunk_counts: tuple[int, ...] = (1, 2, 4, 8)
    warmup: int = 1
    repeats: int = 5
    threads_per_rank: Optional[int] = None
    table: Optional[str] = None  # tuning table path; auto = its thresholds
    backend: str = "aot_eager"
    transport: str = "auto"  # FLASHCOMM_TRANSPORT of the ranks: auto, shm or c10d
    json_path: Optional[str] = "flashcomm_bench.json"
    plot: Optional[str] = "flashcomm_bench.png"


def op_shapes(model_cfg: ModelConfig, tp: int) -> dict[str, tuple[int, int]]:
    """Representative per-rank (K, N) of each op: the reference model's MLP layers,
    ``down`` (row-parallel: K_r = intermediate/tp, N = hidden) for gemm_rs and
    ``gate_up`` (column-parallel: K = hidden, N_r = 2*intermediate/tp) for ag_gemm."""
    H, inter = model_cfg.hidden_size, model_cfg.intermediate_size
    rs, ag = (inter // tp, H), (H, 2 * inter // tp)
    return {"gemm_rs": rs, "gemm_rs_w8a8": rs, "ag_gemm": ag, "ag_gemm_w8a8": ag}


def _op_variants(op: str, pipe_sweep: tuple[tuple[int, int], ...]) -> tuple[str, ...]:
    variants = ["gemm", "comm", "py", "seq", "pipe", "auto"]
    if op.startswith("gemm_rs"):
        variants.insert(2, "tp_ar")  # plain TP has a collective after row-parallel only
    if op == "ag_gemm_w8a8":
        variants.insert(2, "comm_bf16")
    return tuple(variants + [f"pipe@{mc}x{mr}" for mc, mr in pipe_sweep])


def _agreed(values: list, what: str):
    if len(set(values)) != 1:
        raise RuntimeError(f"ranks disagree on {what}: {values}")
    return values[0]


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Runs every part ``cfg`` asks for on ``cfg.tp`` spawned CPU ranks (gloo) and
    returns the result document (config, machine, per-point rows, summary)."""
    model = cfg.model or DEMO_MODEL
    model.check_tp(cfg.tp)
    shapes = op_shapes(model, cfg.tp)
    ns = sorted(set(cfg.tokens))
    table = tuning.load_table(cfg.table) if cfg.table else None
    table_json = tuning.table_to_json(table) if table is not None and table.entries else None
    total = len(cfg.ops) * len(ns)
    total += len(ns) if cfg.run_gemm else 0
    total += len(ns) if cfg.run_chunks else 0
    total += (len(cfg.model_tokens) + 1) if cfg.run_model else 0
    config = asdict(cfg)
    config["model"] = asdict(model)
    result: dict[str, Any] = {"config": config, "ops": [], "gemm": [], "chunks": [],
                              "model": [], "w8a8_bytes": []}
    t_start = time.time()
    with RankPool(cfg.tp, timeout_s=900, threads_per_rank=cfg.threads_per_rank,
                  env={"FLASHCOMM_TRANSPORT": cfg.transport}) as pool, \
            tqdm(total=total, disable=not progress, unit="point") as bar:
        result["machine"] = timing.machine_info(pool)
        fingerprint = _agreed(pool.run(cases.apply_table_on_rank, table_json), "the tuning table")
        result["table"] = {"path": cfg.table, "fingerprint": fingerprint or None,
                           "entries": len(table.entries) if table else 0}
        result["pipeline_config"] = list(pool.run(cases.pipeline_config_on_rank)[0])
        for op in cfg.ops:
            K, N = shapes[op]
            key = "int8" if op.endswith("w8a8") else cfg.dtype
            auto = _agreed(pool.run(cases.auto_threshold_on_rank, op, K, N, key),
                           f"the auto threshold of {op}")
            for n in ns:
                bar.set_description(f"{op} n={n}")
                med = timing.measure_op(pool, op, K, N, n, cfg.dtype,
                                        _op_variants(op, cfg.pipe_sweep), cfg.warmup,
                                        metrics.repeats_at(cfg.repeats, n), cfg.pipe_sweep)
                result["ops"].append(metrics.op_row(op, K, N, n, cfg.tp, med, auto))
                if op == "ag_gemm_w8a8":
                    result["w8a8_bytes"].append(metrics.w8a8_bytes_row(n, K, cfg.tp, cfg.dtype))
                bar.update()
        if cfg.run_gemm:
            K, N = shapes["ag_gemm"]
            for n in ns:
                bar.set_description(f"gemm n={n}")
                med = timing.measure_case(pool, "gemm",
                                          dict(K=K, N=N, n=n, variants=GEMM_VARIANTS),
                                          cfg.warmup, cfg.repeats)
                result["gemm"].append({
                    "n": n, "K": K, "N": N, **{f"{k}_ms": v for k, v in med.items()},
                    "int8_speedup_vs_fp32": metrics.ratio(med["fp32"], med["int8"]),
                    "int8_speedup_vs_bf16": metrics.ratio(med["bf16"], med["int8"]),
                    "w8a8_speedup_vs_fp32": metrics.ratio(med["fp32"], med["w8a8"])})
                bar.update()
        if cfg.run_chunks:
            K, N = shapes["gemm_rs"]
            mr = result["pipeline_config"][1]
            for n in ns:
                bar.set_description(f"chunked gemm n={n}")
                med = timing.measure_case(pool, "chunk",
                                          dict(K=K, N=N, n=n, chunk_counts=cfg.chunk_counts,
                                               min_rows=mr, dtype=cfg.dtype),
                                          cfg.warmup, cfg.repeats)
                row = {"n": n, "K": K, "N": N, "min_chunk_rows": mr, "one_ms": med["one"]}
                c = cases.shard_rows(n, cfg.tp)
                for mc in cfg.chunk_counts:
                    row[f"chunks{mc}_ms"] = med[f"chunks{mc}"]
                    row[f"chunks{mc}_efficiency"] = metrics.ratio(med["one"], med[f"chunks{mc}"])
                    row[f"chunks{mc}_count"] = len(cases.plan_chunks(c, mc, mr))
                result["chunks"].append(row)
                bar.update()
        if cfg.run_model:
            bar.set_description("model: compiling")
            sp = table.sp_threshold if table is not None and table.sp_threshold is not None \
                else flashcomm.DEFAULT_SP_THRESHOLD
            pool.run(cases.model_setup_on_rank, model, cfg.dtype, False, MODEL_VARIANTS,
                     cfg.backend, table_json, sp)
            bar.update()
            result["model_sp_threshold"] = sp
            for n in sorted(set(cfg.model_tokens)):
                bar.set_description(f"model n={n}")
                med = timing.measure_model(pool, n, cfg.warmup, cfg.repeats)
                result["model"].append({
                    "n": n, **{f"{k}_ms": v for k, v in med.items()},
                    "flashcomm_vs_tp": metrics.ratio(med["flashcomm"], med["tp"]),
                    "sharded_vs_tp": metrics.ratio(med["sharded"], med["tp"]),
                    "mode": flashcomm.sp_mode(n, cfg.tp, sp)})
                bar.update()
            rows = result["model"]
            result["model_crossover"] = metrics.crossover(
                [r["n"] for r in rows], [r["tp_ms"] for r in rows], [r["sharded_ms"] for r in rows])
        bar.set_description("done")
    result["machine"]["loadavg_end"] = timing.load_average()
    result["elapsed_s"] = time.time() - t_start
    result["summary"] = metrics.summarize(result)
    return result
