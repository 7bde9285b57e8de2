"""The pipelined GEMM + reduce-scatter on the shared-memory transport with its reductions
overlapped (a helper thread sums chunk i while the GEMM of chunk i+1 runs) against back to
back (each chunk summed right after its GEMM), side by side in one run.

    .venv/bin/python benchmarks/overlap_bench.py [--tp 2] [--threads 1] [--repeats 15]

Two groups over the same ranks, one with FLASHCOMM_SHM_OVERLAP=on and one with off, and
gemm_rs (pipelined: threshold 0) at the reference MLP's down projection (K = 2H / tp,
N = H) for each --tokens, plus the GEMM alone for scale. Calls are timed round robin after
a gloo barrier and a one-element shared-memory all-reduce on a third group (collectives_bench's
timing loop; the counts include its one warm-up call per case); the table shows the median over
repeats of the slowest rank, in ms, and on / off. Overlap can only pay where the helper has
a CPU of its own: read the CPU count printed with the figures. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collectives_bench import _time_round_robin  # noqa: E402  (benchmarks/ is not a package)


def _bench(tokens: list[int], hidden: int, threads: int, repeats: int):
    import flashcomm
    torch.set_num_threads(threads)
    tp = dist.get_world_size()
    groups = {}
    # "align": re-aligns the ranks before every call on a group of its own, so neither
    # measured group gets its slots warmed by it.
    for name, overlap in (("on", "on"), ("off", "off"), ("align", "off")):
        g = dist.new_group(list(range(tp)), backend="gloo")
        os.environ["FLASHCOMM_SHM_OVERLAP"] = overlap
        try:
            flashcomm.init(g, transport="shm")
        finally:
            os.environ.pop("FLASHCOMM_SHM_OVERLAP", None)
        groups[name] = g
    tiny = torch.zeros(1, 1)
    K, N = 2 * hidden // tp, hidden
    w = torch.randn(N, K) / K**0.5
    rows = {}
    for n in tokens:
        x = torch.randn(n, K)
        cases = {
            "gemm alone": lambda: torch.mm(x, w.t()),
            "overlap on": lambda: flashcomm.gemm_rs(x, w, None, groups["on"], threshold=0),
            "overlap off": lambda: flashcomm.gemm_rs(x, w, None, groups["off"], threshold=0),
        }
        flashcomm.reset_stats()
        times_us = _time_round_robin(
            cases, repeats, lambda: flashcomm.sp_reduce_(tiny, groups["align"], 1 << 40),
            lambda: None)
        counts = flashcomm.stats()["shm_reduce"]
        rows[n] = ({k: statistics.median(v) / 1e3 for k, v in times_us.items()}, counts)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    p.add_argument("--hidden", type=int, default=1024, help="H of the reference MLP (default 1024)")
    p.add_argument("--tokens", default="1024,2048,4096,8192", help="comma list of n")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per case (default 15)")
    a = p.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",")]
    from flashcomm.tools.testing import RankPool
    with RankPool(a.tp, timeout_s=600, threads_per_rank=a.threads) as pool:
        results = pool.run(_bench, tokens, a.hidden, a.threads, a.repeats, timeout_s=3600)
    print(f"gemm_rs pipelined, shm, tp={a.tp}, {a.threads} thread(s) per rank, "
          f"{os.cpu_count()} CPUs, H={a.hidden}, float32; median of {a.repeats}, slowest rank, ms")
    print(f"{'n':>6} {'gemm alone':>11} {'overlap on':>11} {'overlap off':>12} {'on/off':>7}"
          f"  reductions (overlapped, inline) per rank 0")
    for n in tokens:
        med = {k: max(r[n][0][k] for r in results) for k in results[0][n][0]}
        counts = results[0][n][1]
        print(f"{n:>6} {med['gemm alone']:11.2f} {med['overlap on']:11.2f} "
              f"{med['overlap off']:12.2f} {med['overlap on'] / med['overlap off']:7.2f}"
              f"  ({counts['overlapped']}, {counts['inline']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
