"""`flashcomm demo`: the compact ops on CPU ranks over gloo, at token counts on
both sides of the strategy threshold, checked against a dense reference."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import flashcomm
from flashcomm.tools.reference import (feature_slice, gemm_rs_reference, gemm_rs_w8a8_reference,
                                       quantize_weight_per_channel, relative_error, token_shard,
                                       w8a8_linear)
from flashcomm.tools.testing import RankPool
from flashcomm.tuning import OPS

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    tp: int = 2
    tokens: tuple[int, ...] = (1, 7, 512, 999, 1000, 1001, 2053, 4096)
    hidden: int = 512
    threshold: int = flashcomm.DEFAULT_THRESHOLD
    repeats: int = 5
    seed: int = 0


@dataclass
class DemoRow:
    op: str
    n: int
    strategy: str
    error: float
    median_ms: float


def _call(op: str, x_full, w, w_q, w_s, threshold: int):
    """One op call on this rank, from full (all-rank) inputs."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    n = x_full.shape[0]
    if op == "gemm_rs":
        return flashcomm.gemm_rs(feature_slice(x_full, tp, rank, 1),
                                 feature_slice(w, tp, rank, 1), None, None, threshold)
    if op == "gemm_rs_w8a8":
        return flashcomm.gemm_rs_w8a8(feature_slice(x_full, tp, rank, 1),
                                      feature_slice(w_q, tp, rank, 1), w_s, None, None, None,
                                      None, torch.float32, threshold)
    shard = token_shard(x_full, tp, rank)
    if op == "ag_gemm":
        return flashcomm.ag_gemm(shard, feature_slice(w, tp, rank, 0), None, None, n, threshold)
    return flashcomm.ag_gemm_w8a8(shard, feature_slice(w_q, tp, rank, 0),
                                  feature_slice(w_s, tp, rank, 0), None, None, None, None, n,
                                  torch.float32, threshold)


def _run_on_rank(op: str, x_full, w, w_q, w_s, threshold: int, repeats: int):
    flashcomm.reset_stats()
    out = _call(op, x_full, w, w_q, w_s, threshold)
    counts = flashcomm.stats()[op]
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        _call(op, x_full, w, w_q, w_s, threshold)
        times.append(time.perf_counter() - t0)
    strategy = "pipelined" if counts["pipelined"] else "sequential"
    return out, strategy, statistics.median(times) * 1e3


def _reference(op: str, x_full, w, w_q, w_s, tp: int) -> torch.Tensor:
    if op == "gemm_rs":
        return gemm_rs_reference(x_full, w, None, tp)
    if op == "ag_gemm":
        return x_full.double() @ w.double().t()
    if op == "gemm_rs_w8a8":
        return gemm_rs_w8a8_reference(x_full, w_q, w_s, None, None, None, tp)
    return w8a8_linear(x_full, w_q, w_s)


def _assemble(op: str, outs: list[torch.Tensor], n: int) -> torch.Tensor:
    if op.startswith("gemm_rs"):
        return torch.cat(outs)[:n]  # token blocks in rank order, padding dropped
    return torch.cat(outs, dim=1)  # output-feature slices in rank order


def run_demo(cfg: DemoConfig) -> list[DemoRow]:
    """Runs every op at every token count on cfg.tp ranks; returns one row each."""
    g = torch.Generator().manual_seed(cfg.seed)
    H = cfg.hidden
    w = torch.randn(H, H, generator=g) / H**0.5
    w_q, w_s = quantize_weight_per_channel(w)
    rows: list[DemoRow] = []
    with RankPool(cfg.tp) as pool:
        for op in OPS:
            for n in cfg.tokens:
                x = torch.randn(n, H, generator=g)
                results = pool.run(_run_on_rank, op, x, w, w_q, w_s, cfg.threshold, cfg.repeats)
                got = _assemble(op, [r[0] for r in results], n)
                err = relative_error(got, _reference(op, x, w, w_q, w_s, cfg.tp))
                strategies = {r[1] for r in results}
                assert len(strategies) == 1, f"ranks disagree on the strategy: {strategies}"
                rows.append(DemoRow(op, n, strategies.pop(), err,
                                    max(r[2] for r in results)))
                logger.info("%s n=%d done", op, n)
    return rows


def format_table(rows: list[DemoRow], cfg: DemoConfig) -> str:
    lines = [
        f"flashcomm {flashcomm.__version__} demo: tp={cfg.tp} (gloo, CPU), H={cfg.hidden}, "
        f"threshold={cfg.threshold} (pipelined iff n > threshold), "
        f"median of {cfg.repeats} repeats",
        f"{'op':<14}{'n':>6}  {'strategy':<11}{'rel. error':>12}{'median ms':>11}",
    ]
    for r in rows:
        lines.append(f"{r.op:<14}{r.n:>6}  {r.strategy:<11}{r.error:>12.2e}{r.median_ms:>11.2f}")
    lines.append("rel. error = max|flashcomm - dense single-process reference| / max|reference|")
    return "\n".join(lines)
