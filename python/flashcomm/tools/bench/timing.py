"""How the benchmarks time: every variant of a case side by side on every rank (round
robin, the order rotated every repeat, a barrier before each call), and per figure the
median over repeats of the slowest rank (a step ends when the slowest rank does)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

import flashcomm
from flashcomm.tools.testing import RankPool

from . import cases


def time_variants(variants: dict[str, cases.Variant], warmup: int,
                  repeats: int) -> dict[str, list[float]]:
    """On one rank: ``warmup`` untimed calls of each variant, then ``repeats`` rounds
    over all of them. Returns the seconds of each call, per variant."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            fn, setup = variants[name]
            for _ in range(warmup):
                if setup:
                    setup()
                dist.barrier()
                fn()
        for i in range(repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                fn, setup = variants[name]
                if setup:
                    setup()
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def time_case_on_rank(builder: str, kwargs: dict, warmup: int,
                      repeats: int) -> dict[str, list[float]]:
    """Builds case ``builder`` (a key of :data:`cases.BUILDERS`) and times it; the
    pipeline config is restored afterwards (variants may change it)."""
    saved = flashcomm.get_pipeline_config()
    try:
        return time_variants(cases.BUILDERS[builder](**kwargs), warmup, repeats)
    finally:
        flashcomm.set_pipeline_config(*saved)


def time_models_on_rank(n: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Times a forward of every compiled model at ``n`` tokens (at least one warm-up:
    the first call at a new n may specialise kernels)."""
    return time_variants(cases.build_model_case(n), max(1, warmup), repeats)


def slowest_rank_medians(per_rank: list[dict[str, list[float]]]) -> dict[str, float]:
    """ms per variant: per repeat the maximum over ranks, then the median over repeats."""
    out = {}
    for name in per_rank[0]:
        steps = [max(r[name][i] for r in per_rank) for i in range(len(per_rank[0][name]))]
        out[name] = statistics.median(steps) * 1e3
    return out


def measure_case(pool: RankPool, builder: str, kwargs: dict, warmup: int,
                 repeats: int) -> dict[str, float]:
    """:func:`time_case_on_rank` on every rank of ``pool``; ms per variant."""
    return slowest_rank_medians(pool.run(time_case_on_rank, builder, kwargs, warmup, repeats))


def measure_op(pool: RankPool, op: str, K: int, N: int, n: int, dtype: str,
               variants: tuple[str, ...], warmup: int, repeats: int,
               pipe_configs: tuple[tuple[int, int], ...] = ()) -> dict[str, float]:
    """ms per variant of :func:`cases.build_op_case`."""
    kwargs = dict(op=op, K=K, N=N, n=n, dtype=dtype, variants=tuple(variants),
                  pipe_configs=tuple(pipe_configs))
    return measure_case(pool, "op", kwargs, warmup, repeats)


def measure_model(pool: RankPool, n: int, warmup: int, repeats: int) -> dict[str, float]:
    """ms per forward of each model compiled by :func:`cases.model_setup_on_rank`."""
    return slowest_rank_medians(pool.run(time_models_on_rank, n, warmup, repeats))


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


def load_average() -> Optional[list[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(pool: Optional[RankPool] = None) -> dict[str, Any]:
    """Where the figures come from: CPU, cores, load, torch, and per rank threads."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": load_average(),
        "torch": torch.__version__,
        "flashcomm": flashcomm.__version__,
        "cuda_available": torch.cuda.is_available(),
        "backend": "gloo (CPU, loopback TCP)",
    }
    if pool is not None:
        info["world_size"] = pool.world_size
        info["ranks"] = pool.run(_rank_info)
    return info
