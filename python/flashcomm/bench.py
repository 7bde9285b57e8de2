"""`flashcomm bench`: the compact ops against their parts and the plain-TP baseline,
on ``tp`` spawned CPU ranks in one gloo group (NCCL is not used here).

Op level, per op (gemm_rs, ag_gemm, and their W8A8 forms) and token count n, all
variants measured side by side in one run (round robin, rotated every repeat):

* ``gemm``: this rank's GEMM alone (W8A8: quantise + int8 GEMM + dequantise);
* ``comm``: the collective alone (reduce-scatter of the [tp*c, N] partials, or the
  all-gather of the [c, K] shards; W8A8: int8 rows + per-token fp32 scales);
* ``tp_ar``: the plain-TP baseline vLLM uses today, ``torch.mm`` + ``all_reduce``
  (row-parallel only: plain TP has no collective before a column-parallel GEMM);
* ``py``: the sharded layout composed in Python, ``torch.mm`` +
  ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` + ``torch.mm``;
* ``seq`` / ``pipe`` / ``auto``: the flashcomm op forced sequential
  (``enabled=False``), forced pipelined (``threshold=0``), and auto
  (``threshold=-1``: the loaded tuning table, else 1000).

Derived: overlap efficiency ``(T_gemm + T_comm - T_pipe) / min(T_gemm, T_comm)``, the
op's overhead over the Python composition (``seq - py``), and auto / best fixed
strategy. Also the int8 vs fp32 / bf16 GEMM, sum-of-chunk GEMMs vs one GEMM,
bytes of the W8A8 all-gather vs bf16, and the compiled reference model
(flashcomm sharded / replicated / auto vs plain TP, and the crossover).

Every figure: per-repeat maximum over ranks (a step ends when the slowest rank
does), median over repeats after warm-up.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

import flashcomm
from flashcomm.reference import quantize_dynamic, quantize_weight_per_channel

logger = logging.getLogger(__name__)

NEVER = 2**62
OPS = ("gemm_rs", "ag_gemm", "gemm_rs_w8a8", "ag_gemm_w8a8")
DEFAULT_TOKENS = (1, 16, 128, 512, 1024, 2048, 4096, 8192)
DEFAULT_MODEL_TOKENS = (1, 64, 256, 1024, 2048, 4096)


# --- rank side --------------------------------------------------------------------

def get_pipeline_config_on_rank() -> tuple[int, int]:
    return flashcomm.get_pipeline_config()


def _rank_info() -> dict[str, Any]:
    return {"rank": dist.get_rank(), "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "pid": os.getpid()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(pool=None) -> dict[str, Any]:
    """Where the figures come from: CPU, cores, load, torch, and per rank threads."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "flashcomm": flashcomm.__version__,
        "cuda_available": torch.cuda.is_available(),
        "backend": "gloo (CPU, loopback TCP)",
    }
    if pool is not None:
        info["world_size"] = pool.world_size
        info["ranks"] = pool.run(_rank_info)
    return info


class _Case:
    """Per-rank state of the case being timed (module global in each worker)."""

    variants: dict[str, tuple[Callable[[], Any], Optional[Callable[[], None]]]] = {}
    models: dict[str, Any] = {}


def _pipe_pre(max_chunks: int, min_rows: int) -> Callable[[], None]:
    return lambda: flashcomm.set_pipeline_config(max_chunks, min_rows)


def _build_op_case(op: str, K: int, N: int, n: int, dtype: str, variants: tuple[str, ...],
                   pipe_configs: tuple[tuple[int, int], ...] = ()) -> dict:
    tp, rank = dist.get_world_size(), dist.get_rank()
    gname = dist.group.WORLD.group_name
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1000 * rank + n)
    c = -(-n // tp)
    w8 = op.endswith("w8a8")
    rs = op.startswith("gemm_rs")
    w = torch.randn(N, K, generator=g).to(dt) / K**0.5
    wq, ws = quantize_weight_per_channel(w) if w8 else (None, None)
    wqT = wq.t().contiguous() if w8 else None  # [K, N] for torch._int_mm

    def gemm(inp: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not w8:
            return torch.mm(inp, w.t(), out=out)
        q, s = quantize_dynamic(inp)
        y = (torch._int_mm(q, wqT).float() * s * ws).to(dt)
        if out is not None:
            out.copy_(y)
            return out
        return y

    V: dict[str, tuple[Callable[[], Any], Optional[Callable[[], None]]]] = {}
    # "GEMM alone" is the op itself on a one-rank group: exactly the op's own GEMM
    # (W8A8: its quantisation, int8 GEMM and dequantisation) with no collective.
    solo = _solo_group_name()
    if rs:
        x = torch.randn(n, K, generator=g).to(dt)
        send = torch.empty(tp * c, N, dtype=dt)
        if tp * c > n:
            send[n:].zero_()
        recv = torch.empty(c, N, dtype=dt)

        def py():
            s = torch.empty(tp * c, N, dtype=dt)
            gemm(x, out=s[:n])
            if tp * c > n:
                s[n:].zero_()
            out = torch.empty(c, N, dtype=dt)
            dist.reduce_scatter_tensor(out, s)
            return out

        def tp_ar():
            y = gemm(x)
            dist.all_reduce(y)
            return y

        def call(thr, en):
            if w8:
                return flashcomm.gemm_rs_w8a8(x, wq, ws, None, None, None, gname, dt, thr, en)
            return flashcomm.gemm_rs(x, w, None, gname, thr, en)

        V["gemm"] = (lambda: _solo_rs(w8, x, w, wq, ws, dt, solo), None)
        V["comm"] = (lambda: dist.reduce_scatter_tensor(recv, send), None)
        V["tp_ar"] = (tp_ar, None)
        V["py"] = (py, None)
    else:
        x_full = torch.randn(n, K, generator=g).to(dt)
        shard = torch.zeros(c, K, dtype=dt)
        lo, hi = min(n, rank * c), min(n, rank * c + c)
        shard[: hi - lo] = x_full[lo:hi]
        gathered = torch.empty(tp * c, K, dtype=dt)
        packed_shard = torch.zeros(c, K + 4, dtype=torch.int8)
        packed_all = torch.empty(tp * c, K + 4, dtype=torch.int8)
        bf_shard = shard.to(torch.bfloat16)
        bf_all = torch.empty(tp * c, K, dtype=torch.bfloat16)

        def py():
            if not w8:
                ga = torch.empty(tp * c, K, dtype=dt)
                dist.all_gather_into_tensor(ga, shard)
                return torch.mm(ga[:n], w.t())
            q, s = quantize_dynamic(shard)
            p = torch.cat([q, s.reshape(-1).view(torch.int8).view(-1, 4)], dim=1)
            ga = torch.empty(tp * c, K + 4, dtype=torch.int8)
            dist.all_gather_into_tensor(ga, p)
            qa = ga[:n, :K]
            sa = ga[:n, K:].contiguous().view(torch.float32)
            return (torch._int_mm(qa, wqT).float() * sa * ws).to(dt)

        def call(thr, en):
            if w8:
                return flashcomm.ag_gemm_w8a8(x=shard, weight=wq, weight_scale=ws,
                                              input_scale=None, input_zero_point=None,
                                              bias=None, group=gname, num_tokens=n,
                                              out_dtype=dt, threshold=thr, enabled=en)
            return flashcomm.ag_gemm(shard, w, None, gname, n, thr, en)

        if w8:
            V["comm"] = (lambda: dist.all_gather_into_tensor(packed_all, packed_shard), None)
            V["comm_bf16"] = (lambda: dist.all_gather_into_tensor(bf_all, bf_shard), None)
        else:
            V["comm"] = (lambda: dist.all_gather_into_tensor(gathered, shard), None)
        V["gemm"] = (lambda: _solo_ag(w8, x_full, w, wq, ws, dt, solo, n), None)
        V["py"] = (py, None)
    base = _pipe_pre(*flashcomm.get_pipeline_config())
    V["seq"] = (lambda: call(NEVER, False), base)
    V["pipe"] = (lambda: call(0, True), base)
    V["auto"] = (lambda: call(-1, True), base)
    for mc, mr in pipe_configs:
        V[f"pipe@{mc}x{mr}"] = (lambda: call(0, True), _pipe_pre(mc, mr))
    return {k: V[k] for k in variants if k in V}


def _solo_group_name() -> str:
    """A one-rank gloo group of this rank (created once, collectively, on every rank)."""
    if "solo" not in _Case.models:
        groups = [dist.new_group([r], backend="gloo") for r in range(dist.get_world_size())]
        _Case.models["solo"] = groups[dist.get_rank()].group_name
    return _Case.models["solo"]


def _solo_rs(w8, x, w, wq, ws, dt, solo):
    if w8:
        return flashcomm.gemm_rs_w8a8(x, wq, ws, None, None, None, solo, dt, NEVER, False)
    return flashcomm.gemm_rs(x, w, None, solo, NEVER, False)


def _solo_ag(w8, x, w, wq, ws, dt, solo, n):
    if w8:
        return flashcomm.ag_gemm_w8a8(x, wq, ws, None, None, None, solo, n, dt, NEVER, False)
    return flashcomm.ag_gemm(x, w, None, solo, n, NEVER, False)


def _build_gemm_case(K: int, N: int, n: int, variants: tuple[str, ...]) -> dict:
    g = torch.Generator().manual_seed(7 + n)
    x = torch.randn(n, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    xb, wb = x.bfloat16(), w.bfloat16()
    wq, ws = quantize_weight_per_channel(w)
    wqT = wq.t().contiguous()
    q, s = quantize_dynamic(x)

    def w8a8():
        qq, ss = quantize_dynamic(x)
        return torch._int_mm(qq, wqT).float() * ss * ws

    V = {"fp32": (lambda: torch.mm(x, w.t()), None),
         "bf16": (lambda: torch.mm(xb, wb.t()), None),
         "int8": (lambda: torch._int_mm(q, wqT), None),
         "w8a8": (w8a8, None)}
    return {k: V[k] for k in variants}


def _plan_chunks(c: int, max_chunks: int, min_rows: int) -> list[tuple[int, int]]:
    """Python mirror of csrc/core/shard.cpp plan_chunks."""
    if c == 0:
        return []
    count = max(1, min(max_chunks, c // min_rows))
    base, extra = divmod(c, count)
    out, begin = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append((begin, begin + size))
        begin += size
    return out


def _build_chunk_case(K: int, N: int, n: int, chunk_counts: tuple[int, ...], min_rows: int,
                      dtype: str) -> dict:
    """One GEMM over n rows vs the pipelined gemm_rs's GEMM calls (tp blocks x chunks,
    each writing into a slice of a send buffer), for each max_chunks."""
    tp = dist.get_world_size()
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(11 + n)
    x = torch.randn(n, K, generator=g).to(dt)
    w = torch.randn(N, K, generator=g).to(dt)
    out = torch.empty(n, N, dtype=dt)
    c = -(-n // tp)
    V = {"one": (lambda: torch.mm(x, w.t(), out=out), None)}
    for mc in chunk_counts:
        chunks = _plan_chunks(c, mc, min_rows)

        def run(chunks=chunks):
            for lo, hi in chunks:
                ln = hi - lo
                send = torch.empty(tp * ln, N, dtype=dt)
                for d in range(tp):
                    a, b = min(n, d * c + lo), min(n, d * c + hi)
                    if b > a:
                        torch.mm(x[a:b], w.t(), out=send[d * ln: d * ln + (b - a)])

        V[f"chunks{mc}"] = (run, None)
    return V


def _time_on_rank(builder: str, kwargs: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Builds the case, warms every variant up, then times them round robin (order
    rotated every repeat), a barrier before each call. Returns seconds per repeat."""
    saved = flashcomm.get_pipeline_config()
    try:
        V = {"op": _build_op_case, "gemm": _build_gemm_case, "chunk": _build_chunk_case}[builder](
            **kwargs)
        names = list(V)
        with torch.no_grad():
            for name in names:
                fn, pre = V[name]
                for _ in range(warmup):
                    if pre:
                        pre()
                    dist.barrier()
                    fn()
            times: dict[str, list[float]] = {name: [] for name in names}
            for i in range(repeats):
                k = i % len(names)
                for name in names[k:] + names[:k]:
                    fn, pre = V[name]
                    if pre:
                        pre()
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        return times
    finally:
        flashcomm.set_pipeline_config(*saved)


def _apply_table_on_rank(table_json: Optional[dict]) -> str:
    from flashcomm import tuning

    if table_json is None:
        torch.ops.flashcomm.clear_auto_thresholds()
        return ""
    table = tuning.table_from_json(table_json)
    tuning.apply_table(table)
    return tuning.table_fingerprint(table)


def model_setup_on_rank(model_cfg, dtype: str, w8a8: bool, variants: tuple[str, ...],
                        backend: str, table_json: Optional[dict],
                        sp_threshold: Optional[int]) -> str:
    """Compiles the reference model in each variant: ``sharded`` (flashcomm,
    sp_threshold=0), ``replicated`` (flashcomm, never sharded), ``flashcomm``
    (flashcomm with ``sp_threshold``), ``tp`` (plain TP). Kernel threshold auto."""
    from flashcomm.models import build_model

    _apply_table_on_rank(table_json)
    torch._dynamo.reset()
    sp = {"sharded": 0, "replicated": NEVER,
          "flashcomm": flashcomm.DEFAULT_SP_THRESHOLD if sp_threshold is None else sp_threshold}
    models = {}
    for v in variants:
        mode = "tp" if v == "tp" else "flashcomm"
        m = build_model(model_cfg, mode, w8a8=w8a8, dtype=getattr(torch, dtype),
                        sp_threshold=sp.get(v, 0), threshold=-1)
        models[v] = torch.compile(m, backend=backend, fullgraph=True, dynamic=True)
    _Case.models = {k: v for k, v in _Case.models.items() if k == "solo"} | models
    return f"rank {dist.get_rank()} compiled {list(models)}"


def _model_time_on_rank(n: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    from torch._dynamo.decorators import mark_unbacked

    models = {k: v for k, v in _Case.models.items() if k != "solo"}
    ids = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n))
    mark_unbacked(ids, 0)
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for name in names:
            for _ in range(max(1, warmup)):
                dist.barrier()
                models[name](ids)
        for i in range(repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                dist.barrier()
                t0 = time.perf_counter()
                models[name](ids)
                times[name].append(time.perf_counter() - t0)
    return times


# --- parent side --------------------------------------------------------------------

def _medians(per_rank: list[dict[str, list[float]]]) -> dict[str, float]:
    """ms: per repeat the max over ranks, then the median over repeats."""
    out = {}
    for name in per_rank[0]:
        steps = [max(r[name][i] for r in per_rank) for i in range(len(per_rank[0][name]))]
        out[name] = statistics.median(steps) * 1e3
    return out


def measure_op(pool, op: str, K: int, N: int, n: int, dtype: str, variants: tuple[str, ...],
               warmup: int, repeats: int,
               pipe_configs: tuple[tuple[int, int], ...] = ()) -> dict[str, float]:
    kwargs = dict(op=op, K=K, N=N, n=n, dtype=dtype, variants=tuple(variants),
                  pipe_configs=tuple(pipe_configs))
    return _medians(pool.run(_time_on_rank, "op", kwargs, warmup, repeats))


def measure_model(pool, n: int, warmup: int, repeats: int) -> dict[str, float]:
    return _medians(pool.run(_model_time_on_rank, n, warmup, repeats))


@dataclass
class BenchConfig:
    tp: int = 2
    model: Any = None  # ModelConfig; None = flashcomm.model_demo.DEMO_MODEL
    dtype: str = "float32"
    ops: tuple[str, ...] = OPS
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
    json_path: Optional[str] = "flashcomm_bench.json"
    plot: Optional[str] = "flashcomm_bench.png"


def op_shapes(model_cfg, tp: int) -> dict[str, tuple[int, int]]:
    """Representative per-rank (K, N) of each op: the reference model's MLP layers,
    ``down`` (row-parallel: K_r = intermediate/tp, N = hidden) for gemm_rs and
    ``gate_up`` (column-parallel: K = hidden, N_r = 2*intermediate/tp) for ag_gemm."""
    H, inter = model_cfg.hidden_size, model_cfg.intermediate_size
    rs, ag = (inter // tp, H), (H, 2 * inter // tp)
    return {"gemm_rs": rs, "gemm_rs_w8a8": rs, "ag_gemm": ag, "ag_gemm_w8a8": ag}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _progress(done: int, total: int, what: str) -> None:
    from flashcomm.tuning import _progress as bar

    bar(done, total, what)


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    from flashcomm import tuning
    from flashcomm.model_demo import DEMO_MODEL
    from flashcomm.testing import RankPool

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
    done = 0
    report = (lambda what: _progress(done, total, what)) if progress else (lambda what: None)
    result: dict[str, Any] = {"config": _config_json(cfg, model), "ops": [], "gemm": [],
                              "chunks": [], "model": [], "w8a8_bytes": []}
    t_start = time.time()
    with RankPool(cfg.tp, timeout_s=900, threads_per_rank=cfg.threads_per_rank) as pool:
        result["machine"] = machine_info(pool)
        fps = pool.run(_apply_table_on_rank, table_json)
        if len(set(fps)) != 1:
            raise RuntimeError(f"ranks disagree on the tuning table: {fps}")
        result["table"] = {"path": cfg.table, "fingerprint": fps[0] or None,
                           "entries": len(table.entries) if table else 0}
        result["pipeline_config"] = list(pool.run(get_pipeline_config_on_rank)[0])
        for op in cfg.ops:
            K, N = shapes[op]
            rs = op.startswith("gemm_rs")
            variants = ["gemm", "comm", "py", "seq", "pipe", "auto"]
            if rs:
                variants.insert(2, "tp_ar")
            if op == "ag_gemm_w8a8":
                variants.insert(2, "comm_bf16")
            variants += [f"pipe@{mc}x{mr}" for mc, mr in cfg.pipe_sweep]
            key = "int8" if op.endswith("w8a8") else cfg.dtype
            thr_auto = table.threshold_for(op, K, N, cfg.tp, key) if table else None
            for n in ns:
                report(f"{op} n={n}")
                med = measure_op(pool, op, K, N, n, cfg.dtype, tuple(variants), cfg.warmup,
                                 _repeats(cfg.repeats, n), cfg.pipe_sweep)
                row = _derive_op_row(op, K, N, n, cfg.tp, med, thr_auto)
                result["ops"].append(row)
                if op == "ag_gemm_w8a8":
                    result["w8a8_bytes"].append(_bytes_row(n, K, cfg.tp, cfg.dtype))
                done += 1
        if cfg.run_gemm:
            K, N = shapes["ag_gemm"]
            for n in ns:
                report(f"gemm n={n}")
                med = _medians(pool.run(_time_on_rank, "gemm",
                                        dict(K=K, N=N, n=n, variants=("fp32", "bf16", "int8",
                                                                      "w8a8")),
                                        cfg.warmup, cfg.repeats))
                result["gemm"].append({"n": n, "K": K, "N": N, **{f"{k}_ms": v for k, v in
                                                                  med.items()},
                                       "int8_speedup_vs_fp32": _ratio(med["fp32"], med["int8"]),
                                       "int8_speedup_vs_bf16": _ratio(med["bf16"], med["int8"]),
                                       "w8a8_speedup_vs_fp32": _ratio(med["fp32"], med["w8a8"])})
                done += 1
        if cfg.run_chunks:
            K, N = shapes["gemm_rs"]
            mr = result["pipeline_config"][1]
            for n in ns:
                report(f"chunked gemm n={n}")
                med = _medians(pool.run(_time_on_rank, "chunk",
                                        dict(K=K, N=N, n=n, chunk_counts=cfg.chunk_counts,
                                             min_rows=mr, dtype=cfg.dtype),
                                        cfg.warmup, cfg.repeats))
                row = {"n": n, "K": K, "N": N, "min_chunk_rows": mr, "one_ms": med["one"]}
                for mc in cfg.chunk_counts:
                    row[f"chunks{mc}_ms"] = med[f"chunks{mc}"]
                    row[f"chunks{mc}_efficiency"] = _ratio(med["one"], med[f"chunks{mc}"])
                    row[f"chunks{mc}_count"] = len(_plan_chunks(-(-n // cfg.tp), mc, mr))
                result["chunks"].append(row)
                done += 1
        if cfg.run_model:
            report("model: compiling")
            sp = table.sp_threshold if table is not None and table.sp_threshold is not None \
                else flashcomm.DEFAULT_SP_THRESHOLD
            pool.run(model_setup_on_rank, model, cfg.dtype, False,
                     ("sharded", "replicated", "flashcomm", "tp"), cfg.backend, table_json, sp)
            done += 1
            result["model_sp_threshold"] = sp
            for n in sorted(set(cfg.model_tokens)):
                report(f"model n={n}")
                med = measure_model(pool, n, cfg.warmup, cfg.repeats)
                result["model"].append({
                    "n": n, **{f"{k}_ms": v for k, v in med.items()},
                    "flashcomm_vs_tp": _ratio(med["flashcomm"], med["tp"]),
                    "sharded_vs_tp": _ratio(med["sharded"], med["tp"]),
                    "mode": "sharded" if n > sp else "replicated"})
                done += 1
            rows = result["model"]
            result["model_crossover"] = tuning.crossover(
                [r["n"] for r in rows], [r["tp_ms"] for r in rows], [r["sharded_ms"] for r in rows])
        report("done")
        done = total
        report("done")
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["elapsed_s"] = time.time() - t_start
    result["summary"] = summarize(result)
    return result


def _repeats(repeats: int, n: int) -> int:
    """Cheap points (n <= 512) get 4x the repeats: their noise is relatively larger."""
    return repeats * 4 if n <= 512 else repeats


def _bytes_row(n: int, K: int, tp: int, dtype: str) -> dict[str, Any]:
    c = -(-n // tp)
    fp_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    w8 = tp * c * (K + 4)  # int8 rows + one fp32 scale per token, one message
    return {"n": n, "K": K, "w8a8_bytes": w8, "bf16_bytes": tp * c * K * 2,
            f"{dtype}_bytes": tp * c * K * fp_bytes, "w8a8_vs_bf16": w8 / (tp * c * K * 2)}


def _derive_op_row(op: str, K: int, N: int, n: int, tp: int, med: dict[str, float],
                   thr_auto: Optional[int]) -> dict[str, Any]:
    best = min(med["seq"], med["pipe"])
    comm = med["comm"]
    row: dict[str, Any] = {"op": op, "K": K, "N": N, "n": n, "tp": tp,
                           **{f"{k}_ms": v for k, v in med.items()}}
    row["overlap_efficiency"] = _ratio(med["gemm"] + comm - med["pipe"], min(med["gemm"], comm))
    row["seq_overhead_ms"] = med["seq"] - med["py"]
    row["seq_vs_py"] = _ratio(med["seq"], med["py"])
    row["pipe_vs_seq"] = _ratio(med["pipe"], med["seq"])
    row["best_fixed"] = "seq" if med["seq"] <= med["pipe"] else "pipe"
    row["auto_vs_best"] = _ratio(med["auto"], best)
    row["auto_threshold"] = thr_auto if thr_auto is not None else flashcomm.DEFAULT_THRESHOLD
    row["auto_strategy"] = "pipe" if (tp > 1 and n > row["auto_threshold"]) else "seq"
    # The policy's cost: the fixed strategy auto resolves to, against the faster fixed
    # strategy, both from the fixed-strategy timings (1.0 when auto picks the faster).
    row["choice_vs_best"] = _ratio(med[row["auto_strategy"]], best)
    # auto vs the fixed strategy it resolves to: the same code path, so this is noise
    row["auto_vs_same"] = _ratio(med["auto"], med[row["auto_strategy"]])
    if "tp_ar_ms" in row:
        row["best_vs_tp_ar"] = _ratio(best, med["tp_ar"])
    return row


def summarize(result: dict[str, Any]) -> dict[str, Any]:
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
            "seq_crossover": _crossover_rows(rows),
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


def _crossover_rows(rows: list[dict[str, Any]]) -> int:
    from flashcomm.tuning import crossover

    return crossover([r["n"] for r in rows], [r["seq_ms"] for r in rows],
                     [r["pipe_ms"] for r in rows])


def _config_json(cfg: BenchConfig, model) -> dict[str, Any]:
    d = asdict(cfg)
    d["model"] = asdict(model)
    return d


# --- output ---------------------------------------------------------------------------

def _fmt_thr(v: Optional[int]) -> str:
    return "never" if v is not None and v >= NEVER else str(v)


def format_report(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    lines = [
        f"flashcomm {m['flashcomm']} bench: tp={m.get('world_size')} CPU ranks over gloo; "
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
        f"threads/rank {[r['torch_threads'] for r in m.get('ranks', [])]}, "
        f"load avg start {m['loadavg']} end {m.get('loadavg_end')}",
        f"{c['dtype']}; median of {c['repeats']} repeats ({4 * c['repeats']} for ops at n <= 512) "
        f"after {c['warmup']} warm-up, per repeat "
        f"the slowest rank; variants interleaved in one run; pipeline config "
        f"(max_chunks, min_chunk_rows) = {tuple(result['pipeline_config'])}; tuning table: "
        f"{result['table']['path'] or 'none (auto = 1000)'}",
        "",
    ]
    ops = result["ops"]
    for op in dict.fromkeys(r["op"] for r in ops):
        rows = [r for r in ops if r["op"] == op]
        K, N = rows[0]["K"], rows[0]["N"]
        extra = [k[:-3] for k in rows[0] if k.endswith("_ms") and k[:-3] not in
                 ("gemm", "comm", "tp_ar", "py", "seq", "pipe", "auto", "comm_bf16",
                  "seq_overhead")]
        hdr = (f"{'n':>6}{'gemm':>9}{'comm':>9}" + (f"{'ag_bf16':>9}" if op == "ag_gemm_w8a8"
                                                     else "")
               + (f"{'mm+AR':>9}" if op.startswith("gemm_rs") else "")
               + f"{'py':>9}{'seq':>9}{'pipe':>9}{'auto':>9}"
               + "".join(f"{e:>13}" for e in extra)
               + f"{'overlap':>9}{'seq-py':>8}{'pipe/seq':>9}{'auto/best':>10}"
               + f"{'choice/best':>12}")
        lines.append(f"{op}: per-rank K={K} N={N} (ms; overlap = (gemm+comm-pipe)/min(gemm,comm);"
                     f" auto threshold {_fmt_thr(rows[0]['auto_threshold'])})")
        lines.append(hdr)
        for r in rows:
            line = f"{r['n']:>6}{r['gemm_ms']:>9.2f}{r['comm_ms']:>9.2f}"
            if op == "ag_gemm_w8a8":
                line += f"{r['comm_bf16_ms']:>9.2f}"
            if op.startswith("gemm_rs"):
                line += f"{r['tp_ar_ms']:>9.2f}"
            line += (f"{r['py_ms']:>9.2f}{r['seq_ms']:>9.2f}{r['pipe_ms']:>9.2f}"
                     f"{r['auto_ms']:>9.2f}")
            line += "".join(f"{r[e + '_ms']:>13.2f}" for e in extra)
            line += (f"{r['overlap_efficiency']:>9.2f}{r['seq_overhead_ms']:>8.2f}"
                     f"{r['pipe_vs_seq']:>9.2f}{r['auto_vs_best']:>10.3f}"
                     f"{r['choice_vs_best']:>12.3f}")
            lines.append(line)
        lines.append("")
    if result["gemm"]:
        g0 = result["gemm"][0]
        lines.append(f"GEMM alone [n, {g0['K']}] x [{g0['K']}, {g0['N']}] on every rank at once "
                     f"(ms)")
        lines.append(f"{'n':>6}{'fp32':>9}{'bf16':>9}{'int8':>9}{'w8a8':>9}"
                     f"{'fp32/int8':>11}{'bf16/int8':>11}{'fp32/w8a8':>11}")
        for r in result["gemm"]:
            lines.append(f"{r['n']:>6}{r['fp32_ms']:>9.2f}{r['bf16_ms']:>9.2f}{r['int8_ms']:>9.2f}"
                         f"{r['w8a8_ms']:>9.2f}{r['int8_speedup_vs_fp32']:>11.2f}"
                         f"{r['int8_speedup_vs_bf16']:>11.2f}{r['w8a8_speedup_vs_fp32']:>11.2f}")
        lines.append("int8 = torch._int_mm alone; w8a8 = dynamic per-token quantise + int8 GEMM + "
                     "dequantise")
        lines.append("")
    if result["chunks"]:
        ch = result["chunks"]
        counts = [k[6:-3] for k in ch[0] if k.startswith("chunks") and k.endswith("_ms")]
        lines.append(f"sum of chunk GEMMs vs one GEMM (gemm_rs pipelined, tp blocks x chunks, "
                     f"K={ch[0]['K']} N={ch[0]['N']}, min_chunk_rows={ch[0]['min_chunk_rows']}); "
                     f"efficiency = one / sum")
        lines.append(f"{'n':>6}{'one ms':>9}" + "".join(f"{'max ' + k:>14}" for k in counts))
        for r in ch:
            lines.append(f"{r['n']:>6}{r['one_ms']:>9.2f}" + "".join(
                f"{r[f'chunks{k}_efficiency']:>9.2f}({r[f'chunks{k}_count']:>2})" + " " * 1
                for k in counts))
        lines.append("")
    if result["w8a8_bytes"]:
        b = result["w8a8_bytes"][-1]
        lines.append(f"W8A8 all-gather bytes at n={b['n']}, K={b['K']}: {b['w8a8_bytes']} vs bf16 "
                     f"{b['bf16_bytes']} ({b['w8a8_vs_bf16']:.3f}x; int8 rows + fp32 per-token "
                     f"scale = (K+4)/(2K))")
        lines.append("")
    if result["model"]:
        mc = c["model"]
        lines.append(f"reference model compiled ({c['backend']}, fullgraph, unbacked n), "
                     f"{mc['num_layers']} layers, hidden {mc['hidden_size']}, intermediate "
                     f"{mc['intermediate_size']}; flashcomm sp_threshold="
                     f"{_fmt_thr(result['model_sp_threshold'])}, kernel threshold auto (ms)")
        lines.append(f"{'n':>6}{'plain TP':>10}{'fc auto':>10}{'fc shard':>10}{'fc repl':>10}"
                     f"{'auto/TP':>9}{'shard/TP':>9}  mode")
        for r in result["model"]:
            lines.append(f"{r['n']:>6}{r['tp_ms']:>10.2f}{r['flashcomm_ms']:>10.2f}"
                         f"{r['sharded_ms']:>10.2f}{r['replicated_ms']:>10.2f}"
                         f"{r['flashcomm_vs_tp']:>9.2f}{r['sharded_vs_tp']:>9.2f}  {r['mode']}")
        lines.append(f"crossover (sharded beats plain TP at every larger measured n): n > "
                     f"{_fmt_thr(result['model_crossover'])}")
        lines.append("")
    s = result["summary"]
    for op in (o for o in OPS if o in s):
        v = s[op]
        eff = v["max_overlap_efficiency"]
        ovh = v["small_n_overhead_ms"]
        lines.append(f"{op:<13} overlap eff (max, n>=1024) "
                     f"{'-' if eff is None else f'{eff:.2f}'}; best pipe/seq "
                     f"{v['best_pipe_vs_seq']:.2f}; seq-py overhead n<=16 "
                     f"{'-' if ovh is None else f'{ovh:.3f} ms'}; seq->pipe crossover "
                     f"{_fmt_thr(v['seq_crossover'])}; auto/best worst "
                     f"{v['worst_auto_vs_best']:.3f} (within 5% at "
                     f"{v['auto_within_5pct_at']}/{v['points']}; picks the faster at "
                     f"{v['auto_picks_best_at']}/{v['points']}; its choice within 5% of the "
                     f"faster at {v['choice_within_5pct_at']}/{v['points']}, worst "
                     f"{v['worst_choice_vs_best']:.3f}; same-path noise up to "
                     f"{v['noise_auto_vs_same_max']:.0%})")
    lines.append(f"elapsed {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in result["ops"]))
    panels = len(ops) + (1 if result["model"] else 0)
    cols = 2
    rows_n = -(-panels // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(11, 3.8 * rows_n), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        rows = [r for r in result["ops"] if r["op"] == op]
        ns = [r["n"] for r in rows]
        for key, style, label in (("gemm", ":", "GEMM alone"), ("comm", ":", "collective alone"),
                                  ("tp_ar", "--", "mm + all_reduce (plain TP)"),
                                  ("py", "--", "mm + RS/AG in Python"),
                                  ("seq", "o-", "flashcomm sequential"),
                                  ("pipe", "s-", "flashcomm pipelined"),
                                  ("auto", "x-", "flashcomm auto")):
            if f"{key}_ms" in rows[0]:
                ax.plot(ns, [r[f"{key}_ms"] for r in rows], style, label=label, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op} K={rows[0]['K']} N={rows[0]['N']}")
        ax.set_xlabel("tokens n")
        ax.set_ylabel("ms (median)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if result["model"]:
        ax = list(axes.flat)[len(ops)]
        rows = result["model"]
        ns = [r["n"] for r in rows]
        for key, style, label in (("tp", "s--", "plain TP"), ("flashcomm", "o-", "flashcomm"),
                                  ("sharded", ":", "flashcomm forced sharded"),
                                  ("replicated", ":", "flashcomm forced replicated")):
            ax.plot(ns, [r[f"{key}_ms"] for r in rows], style, label=label, markersize=4)
        ax.set_xscale("symlog", linthresh=16)
        ax.set_yscale("log")
        ax.set_title("reference model (compiled)")
        ax.set_xlabel("tokens n")
        ax.set_ylabel("ms per forward")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    m = result["machine"]
    fig.suptitle(f"flashcomm bench, tp={m.get('world_size')} gloo ranks, {m['cpu']}, "
                 f"{m['logical_cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


__all__ = ["BenchConfig", "format_report", "machine_info", "measure_model", "measure_op",
           "op_shapes", "run_bench", "summarize", "write_json", "write_plot"]
