"""What bitwise mode invariance (FLASHCOMM_BITWISE_MODES=1) costs at decode sizes on
the c10d transport (gloo): the replicated row-parallel reduction as one all-reduce
(plain, the default) against the sharded path's reduce-scatter over the same padded
row blocks followed by an all-gather (bitwise), side by side in one run.

    .venv/bin/python benchmarks/bitwise_modes_bench.py [--tp 2 4] [--repeats 31] [--json out.json]

Cases per (n, H), float32: `sp_reduce_` of an [n, H] partial (what the vLLM
integration calls after an engine's GEMM; the collective alone) and `sp_row_linear`
of x [n, H/tp] by W [H, H/tp] (flashcomm's GEMM + the collective). Every case runs
round robin with the order rotated each repeat, after a gloo barrier; the table shows
the median over repeats of the slowest rank and the relative cost of the bitwise form.
At tp = 2 the setting changes nothing (one addition of two partials is the same in
any collective), so the figures there show the noise. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

NS = [1, 4, 16, 64]
HS = [512, 1024, 2048, 4096]
BIG = 1 << 40  # sp_threshold that keeps every call replicated


def _bench(repeats: int):
    import flashcomm
    torch.set_num_threads(1)
    rank, tp = dist.get_rank(), dist.get_world_size()
    g = dist.new_group(list(range(tp)), backend="gloo")
    flashcomm.init(g, transport="c10d")
    rows = {}
    for h in HS:
        w = flashcomm.prepare_linear(torch.randn(h, h // tp) / h**0.5)
        for n in NS:
            partial = torch.randn(n, h)
            work = partial.clone()
            x = torch.randn(n, h // tp)

            def reduce(on):
                flashcomm.set_bitwise_modes(on)
                flashcomm.sp_reduce_(work, g, BIG)

            def row(on):
                flashcomm.set_bitwise_modes(on)
                flashcomm.sp_row_linear(x, w, None, g, BIG)

            cases = {("sp_reduce_", "plain"): lambda: reduce(False),
                     ("sp_reduce_", "bitwise"): lambda: reduce(True),
                     ("sp_row_linear", "plain"): lambda: row(False),
                     ("sp_row_linear", "bitwise"): lambda: row(True)}
            keys = list(cases)
            for key in keys:  # warm
                cases[key]()
            out = {key: [] for key in keys}
            for rep in range(repeats):
                shift = rep % len(keys)
                for key in keys[shift:] + keys[:shift]:
                    work.copy_(partial)
                    dist.barrier(group=g)
                    t0 = time.perf_counter()
                    cases[key]()
                    out[key].append((time.perf_counter() - t0) * 1e6)
            for key, v in out.items():
                rows[(n, h) + key] = v
    flashcomm.set_bitwise_modes(False)
    return rank, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="ranks, default 2 4")
    p.add_argument("--repeats", type=int, default=31, help="timed calls per case")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    from flashcomm.tools.testing import RankPool
    report = {}
    for tp in a.tp:
        with RankPool(tp, timeout_s=600, threads_per_rank=1) as pool:
            results = pool.run(_bench, a.repeats, timeout_s=3600)
        table = {key: max(statistics.median(r[1][key]) for r in results)
                 for key in results[0][1]}
        print(f"c10d (gloo), tp={tp}, float32, median of {a.repeats} (slowest rank), µs")
        print(f"{'n':>4} {'H':>5} {'op':<14} {'plain':>9} {'bitwise':>9} {'cost':>7}")
        for h in HS:
            for n in NS:
                for op in ("sp_reduce_", "sp_row_linear"):
                    plain, bitwise = table[(n, h, op, "plain")], table[(n, h, op, "bitwise")]
                    print(f"{n:>4} {h:>5} {op:<14} {plain:9.1f} {bitwise:9.1f} "
                          f"{100 * (bitwise / plain - 1):+6.1f}%")
        report[tp] = {"|".join(map(str, k)): v for k, v in table.items()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"repeats": a.repeats, "median_us": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
