"""`flashcomm demo`: the reference decoder on CPU ranks over gloo, compiled once,
run at token counts that cross sp_threshold both ways; flashcomm against plain TP
(latency) and against the dense single-process model (logits)."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

import flashcomm
from flashcomm.tools.models import DEMO_MODEL, ModelConfig, build_model
from flashcomm.tools.testing import RankPool

logger = logging.getLogger(__name__)


@dataclass
class ModelDemoConfig:
    tp: int = 2
    model: ModelConfig = DEMO_MODEL
    tokens: tuple[int, ...] = (1, 16, 256, 1000, 1001, 2048, 1000, 16, 1)
    sp_threshold: int = flashcomm.DEFAULT_SP_THRESHOLD
    threshold: int = -1
    dtype: str = "float32"
    w8a8: bool = False
    repeats: int = 5
    backend: str = "aot_eager"
    plot: Optional[str] = "flashcomm_demo.png"


@dataclass
class ModelDemoRow:
    n: int
    mode: str
    strategy: str
    flashcomm_ms: float
    plain_tp_ms: float
    max_abs_diff: float
    graphs: int


def _median_ms(fn, ids, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class _RankState:
    """Per-rank models, built once per demo run (module global in each worker)."""

    models: dict = {}


def _setup_on_rank(cfg: ModelDemoConfig) -> str:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kwargs = dict(w8a8=cfg.w8a8, dtype=getattr(torch, cfg.dtype), sp_threshold=cfg.sp_threshold,
                  threshold=cfg.threshold)
    flash = build_model(cfg.model, "flashcomm", **kwargs)
    plain = build_model(cfg.model, "tp", **kwargs)
    _RankState.models = {
        "flashcomm": torch.compile(flash, backend=cfg.backend, fullgraph=True, dynamic=True),
        "tp": torch.compile(plain, backend=cfg.backend, fullgraph=True, dynamic=True),
        "dense": build_model(cfg.model, "dense", **kwargs),
        "backend": cfg.backend,
    }
    return f"rank {dist.get_rank()} ready"


def _step_on_rank(n: int, repeats: int):
    from torch._dynamo.decorators import mark_unbacked

    m = _RankState.models
    ids = torch.randint(0, m["dense"].cfg.vocab_size, (n,),
                        generator=torch.Generator().manual_seed(n))
    if m["backend"] == "inductor":
        torch._dynamo.mark_dynamic(ids, 0)  # see DESIGN notes: inductor needs a backed dim
    else:
        mark_unbacked(ids, 0)  # no guard on n can enter the graph
    with torch.no_grad():
        flashcomm.reset_stats()
        logits = m["flashcomm"](ids)  # also the warm-up (and the compile on first use)
        stats = flashcomm.stats()
        m["tp"](ids)
        flash_ms = _median_ms(m["flashcomm"], ids, repeats)
        plain_ms = _median_ms(m["tp"], ids, repeats)
        diff = (logits - m["dense"](ids)).abs().max().item()
    mode = "sharded" if stats["sp_add_rms_norm"]["sharded"] else "replicated"
    compact = {**stats["gemm_rs"], **{f"w8a8_{k}": v for k, v in stats["gemm_rs_w8a8"].items()}}
    strategies = sorted({k.replace("w8a8_", "") for k, v in compact.items() if v})
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return mode, "+".join(strategies) or "-", flash_ms, plain_ms, diff, graphs


def run_model_demo(cfg: ModelDemoConfig) -> list[ModelDemoRow]:
    """Runs the demo on cfg.tp spawned ranks; returns one row per token count."""
    rows: list[ModelDemoRow] = []
    with RankPool(cfg.tp, timeout_s=900) as pool, tqdm(total=len(cfg.tokens)) as bar:
        pool.run(_setup_on_rank, cfg)
        for n in cfg.tokens:
            bar.set_description(f"n={n}")
            per_rank = pool.run(_step_on_rank, n, cfg.repeats)
            modes = {r[0] for r in per_rank}
            if len(modes) != 1:
                raise RuntimeError(f"ranks disagree on the layout mode at n={n}: {modes}")
            mode, strategy, _, _, _, graphs = per_rank[0]
            rows.append(ModelDemoRow(
                n=n, mode=mode, strategy=strategy,
                flashcomm_ms=max(r[2] for r in per_rank),  # a step ends when the slowest rank does
                plain_tp_ms=max(r[3] for r in per_rank),
                max_abs_diff=max(r[4] for r in per_rank), graphs=graphs))
            bar.update()
        bar.set_description("done")
    return rows


def format_model_table(rows: list[ModelDemoRow], cfg: ModelDemoConfig) -> str:
    m = cfg.model
    lines = [
        f"flashcomm {flashcomm.__version__}: reference decoder, tp={cfg.tp} CPU ranks over gloo, "
        f"{m.num_layers} layers, hidden {m.hidden_size}, {cfg.dtype}{' W8A8' if cfg.w8a8 else ''}",
        f"sp_threshold={cfg.sp_threshold} (sharded iff n > sp_threshold), torch.compile "
        f"backend={cfg.backend} fullgraph, dynamic token dim; median of {cfg.repeats} repeats",
        f"{'n':>6}  {'mode':<11}{'strategy':<22}{'flashcomm ms':>13}{'plain TP ms':>13}"
        f"{'ratio':>7}{'max|dlogit|':>13}{'graphs':>8}",
    ]
    for r in rows:
        ratio = r.flashcomm_ms / r.plain_tp_ms if r.plain_tp_ms else float("nan")
        lines.append(f"{r.n:>6}  {r.mode:<11}{r.strategy:<22}{r.flashcomm_ms:>13.2f}"
                     f"{r.plain_tp_ms:>13.2f}{ratio:>7.2f}{r.max_abs_diff:>13.2e}{r.graphs:>8}")
    lines.append("max|dlogit| = max |flashcomm logits - dense single-process logits|; graphs = "
                 "graphs compiled so far on rank 0 (flashcomm + plain TP models)")
    return "\n".join(lines)


def write_plot(rows: list[ModelDemoRow], cfg: ModelDemoConfig, path: str) -> None:
    """Latency vs n for flashcomm and plain TP (one point per distinct n, the last run)."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("flashcomm demo: the plot needs matplotlib (pip install "
                           "'flashcomm[demo]'), or pass --plot ''") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = {r.n: r for r in rows}
    ns = sorted(last)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ns, [last[n].flashcomm_ms for n in ns], "o-", label="flashcomm (layout-invariant)")
    ax.plot(ns, [last[n].plain_tp_ms for n in ns], "s--", label="plain TP (GEMM + all-reduce)")
    ax.axvline(cfg.sp_threshold, color="grey", linestyle=":", label="sp_threshold")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per forward (n)")
    ax.set_ylabel("latency per forward (ms, median)")
    ax.set_title(f"reference decoder, tp={cfg.tp} CPU/gloo, {cfg.dtype}"
                 f"{' W8A8' if cfg.w8a8 else ''}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)
