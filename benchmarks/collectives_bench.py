"""Collective latency between CPU ranks on one host: flashcomm's shared-memory transport
against gloo (c10d, through flashcomm and raw) and vLLM's shared-memory all-reduce.

    .venv/bin/python benchmarks/collectives_bench.py [--tp 2] [--repeats 25] [--json out.json]

Every rank times the same sequence of calls (before each call a gloo barrier, then a
one-element shared-memory all-reduce so that the ranks start together); the table shows
the median over repeats of the slowest rank. The collectives run in place (sp_reduce_ and
sp_gather_, as the vLLM integration calls them; vLLM's all-reduce on CPU is in place too);
"new output" is the allocating sp_reduce / sp_gather, whose time is mostly the first touch
of a fresh output. Sizes are the bytes of the full [n, 1024]
float32 tensor each rank holds (all-reduce / reduce-scatter input; all-gather output).
Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

SIZES = {"4KiB": 1, "256KiB": 64, "4MiB": 1024, "32MiB": 8192}  # rows of 1024 fp32
COLS = 1024
BIG = 1 << 40  # sp_threshold that keeps every call replicated


def _vllm_all_reduce():
    """vLLM's own all-reduce op over a TP group spanning the default group, or None."""
    try:
        from flashcomm.vllm.standalone import init_vllm_tp, vllm_tp_transport
        from vllm.distributed import get_tp_group
    except Exception:
        return None, "vLLM not importable"
    init_vllm_tp()
    name = get_tp_group().unique_name
    return (lambda t: torch.ops.vllm.all_reduce(t, name)), vllm_tp_transport()


def _time_round_robin(cases: dict, repeats: int, align, reset) -> dict:
    """Every case `repeats` times, round robin with the order rotated each repeat (the
    same on every rank), so that drift of the machine falls on all cases alike."""
    keys = list(cases)
    for key in keys:  # warm: set-up, first touch of buffers
        cases[key]()
    out = {key: [] for key in keys}
    for rep in range(repeats):
        shift = rep % len(keys)
        for key in keys[shift:] + keys[:shift]:
            reset()
            dist.barrier()
            align()  # ranks leave a gloo barrier far apart; a tiny shm all-reduce re-aligns them
            t0 = time.perf_counter()
            cases[key]()
            out[key].append((time.perf_counter() - t0) * 1e6)
    return out


def _bench(repeats: int):
    import flashcomm
    torch.set_num_threads(1)
    rank, tp = dist.get_rank(), dist.get_world_size()
    ranks = list(range(tp))
    groups = {}
    # "shm": the default all-reduce algorithm (one-shot at tp = 2, two-shot from 256 KiB at
    # tp >= 3); "shm one-shot" / "shm two-shot": each forced (FLASHCOMM_SHM_TWO_SHOT_BYTES,
    # read when the group is set up).
    # "align": its own group, so that no measured group gets its slots warmed by the
    # alignment all-reduce before every call.
    for name, transport, two_shot in (("shm", "shm", None), ("c10d", "c10d", None),
                                      ("align", "shm", None),
                                      ("shm one-shot", "shm", str(1 << 62)),
                                      ("shm two-shot", "shm", "0")):
        g = dist.new_group(ranks, backend="gloo")
        if two_shot is not None:
            os.environ["FLASHCOMM_SHM_TWO_SHOT_BYTES"] = two_shot
        try:
            flashcomm.init(g, transport=transport)
        finally:
            os.environ.pop("FLASHCOMM_SHM_TWO_SHOT_BYTES", None)
        groups[name] = g
    raw = dist.new_group(ranks, backend="gloo")
    vllm_ar, vllm_transport = _vllm_all_reduce()
    tiny = torch.zeros(1, 1)

    def align():
        flashcomm.sp_reduce_(tiny, groups["align"], BIG)
    rows = {}
    for label, n in SIZES.items():
        full = torch.randn(n, COLS)
        # Shapes: all-reduce and reduce-scatter of the [n, COLS] tensor; all-gather
        # assembling it from the ranks' blocks. In-place calls reduce `work`, refilled
        # from `full` before every call (outside the timing).
        work = full.clone()
        block = torch.empty(-(-n // tp), COLS)
        cases = {
            ("all_reduce", "flashcomm shm"):
                lambda: flashcomm.sp_reduce_(work, groups["shm"], BIG),
            ("all_reduce", "flashcomm shm, new output"):
                lambda: flashcomm.sp_reduce(full, groups["shm"], BIG),
            ("all_reduce", "flashcomm shm one-shot"):
                lambda: flashcomm.sp_reduce_(work, groups["shm one-shot"], BIG),
            ("all_reduce", "flashcomm shm two-shot"):
                lambda: flashcomm.sp_reduce_(work, groups["shm two-shot"], BIG),
            ("all_reduce", "flashcomm c10d"):
                lambda: flashcomm.sp_reduce_(work, groups["c10d"], BIG),
            ("all_reduce", "gloo"): lambda: dist.all_reduce(work, group=raw),
            ("reduce_scatter", "flashcomm shm"):
                lambda: flashcomm.sp_reduce_(work, groups["shm"], 0),
            ("reduce_scatter", "flashcomm shm, new output"):
                lambda: flashcomm.sp_reduce(full, groups["shm"], 0),
            ("reduce_scatter", "flashcomm c10d"):
                lambda: flashcomm.sp_reduce_(work, groups["c10d"], 0),
            ("reduce_scatter", "gloo"):
                lambda: dist.reduce_scatter_tensor(
                    block, torch.nn.functional.pad(full, (0, 0, 0, block.shape[0] * tp - n)),
                    group=raw),
            ("all_gather", "flashcomm shm"):
                lambda: flashcomm.sp_gather_(work, groups["shm"], 0),
            ("all_gather", "flashcomm shm, new output"):
                lambda: flashcomm.sp_gather(full, groups["shm"], 0),
            ("all_gather", "flashcomm c10d"):
                lambda: flashcomm.sp_gather_(work, groups["c10d"], 0),
            ("all_gather", "gloo"):
                lambda: dist.all_gather_into_tensor(torch.empty(block.shape[0] * tp, COLS),
                                                    block, group=raw),
        }
        if vllm_ar is not None:
            cases[("all_reduce", "vLLM shm_allreduce")] = lambda: vllm_ar(work)
        timed = _time_round_robin(cases, repeats, align, lambda: work.copy_(full))
        rows.update({(label,) + key: v for key, v in timed.items()})
    return rank, rows, vllm_transport


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="ranks (processes), default 2")
    p.add_argument("--repeats", type=int, default=25, help="timed calls per case")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    from flashcomm.tools.testing import RankPool
    with RankPool(a.tp, timeout_s=600, threads_per_rank=1,
                  env={"VLLM_CPU_OMP_THREADS_BIND": "all"}) as pool:
        results = pool.run(_bench, a.repeats, timeout_s=3600)
    keys = list(results[0][1].keys())
    table = {}
    for key in keys:
        per_rank = [statistics.median(r[1][key]) for r in results]
        table[key] = max(per_rank)
    print(f"collectives, tp={a.tp}, float32, median of {a.repeats} (slowest rank), µs; "
          f"vLLM's TP all-reduce: {results[0][2]}")
    kinds = ("all_reduce", "reduce_scatter", "all_gather")
    impls = sorted({k[2] for k in keys})
    print(f"{'size':>7} {'collective':<15} " + " ".join(f"{i:>20}" for i in impls))
    for label in SIZES:
        for kind in kinds:
            cells = [table.get((label, kind, i)) for i in impls]
            print(f"{label:>7} {kind:<15} " + " ".join(
                f"{c:20.1f}" if c is not None else f"{'-':>20}" for c in cells))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tp": a.tp, "repeats": a.repeats, "vllm_transport": results[0][2],
                       "median_us": {"|".join(k): v for k, v in table.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
