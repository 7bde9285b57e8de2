"""Soak test: many calls of every op (compact and layout-invariant) on a real gloo group
(default 10,000 calls per op on 2 CPU ranks), watching for leaks, counter drift and slowdown.

For each op, every rank builds its inputs once, warms up, clears the counters and
then calls the op in a loop, alternating a token count below the threshold
(sequential) and one above it (pipelined). Every ``--window`` calls it records its
resident memory (VmRSS from /proc/self/status) and the wall time of the window.

Pass/fail (exit status 1 on failure):
  * memory: on every rank, VmRSS may not exceed its value after the warm-up by
    more than ``--rss-bound-mib`` (default 64 MiB) at any window, for any op;
  * counters: after the loop, flashcomm.stats() on every rank must show exactly
    calls/2 sequential and calls/2 pipelined calls of that op and none of the others.
The per-window times are printed with their trend (last-3 / first-3 windows and
a least-squares slope); they are figures, not pass/fail (a ratio above
``--warn-slowdown`` prints a warning).

    python benchmarks/soak.py [--calls 10000] [--window 1000] [--tp 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

import flashcomm
from flashcomm.tools.reference import feature_slice, quantize_weight_per_channel, token_shard
from flashcomm.tools.testing import RankPool

OPS = ("gemm_rs", "ag_gemm", "gemm_rs_w8a8", "ag_gemm_w8a8", "sp_row_linear",
       "sp_column_linear", "sp_row_linear_w8a8", "sp_column_linear_w8a8", "sp_add_rms_norm")
STRATEGIES = ("sequential", "pipelined")
MODES = ("replicated", "sharded")  # the paths of the layout-invariant (sp_*) ops


def paths(op: str) -> tuple[str, str]:
    """The two counted paths of `op`: below / above its threshold."""
    return MODES if op.startswith("sp_") else STRATEGIES


def rss_mib() -> float:
    """This process's resident set size (VmRSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _make_call(op: str, n: int, hidden: int, threshold: int, seed: int):
    """A zero-argument closure calling `op` on this rank with inputs built once."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed + n)
    x_full = torch.randn(n, hidden, generator=g)
    w = torch.randn(hidden, hidden, generator=g) / hidden**0.5
    bias = torch.randn(hidden, generator=g)
    w_q, w_s = quantize_weight_per_channel(w)
    if op == "gemm_rs":
        x, wr = feature_slice(x_full, tp, rank, 1), feature_slice(w, tp, rank, 1)
        return lambda: flashcomm.gemm_rs(x, wr, bias, None, threshold)
    if op == "gemm_rs_w8a8":
        x, wr = feature_slice(x_full, tp, rank, 1), feature_slice(w_q, tp, rank, 1)
        return lambda: flashcomm.gemm_rs_w8a8(x, wr, w_s, None, None, bias, None,
                                              torch.float32, threshold)
    if op.startswith("sp_"):
        # Layout-invariant ops: `threshold` is the model-wide sp_threshold.
        xr = feature_slice(x_full, tp, rank, 1)
        wc, bc = feature_slice(w, tp, rank, 0), feature_slice(bias, tp, rank, 0)
        wqc, wsc = feature_slice(w_q, tp, rank, 0), feature_slice(w_s, tp, rank, 0)
        calls = {
            "sp_row_linear": lambda: flashcomm.sp_row_linear(
                xr, feature_slice(w, tp, rank, 1), bias, None, threshold),
            "sp_column_linear": lambda: flashcomm.sp_column_linear(x_full, wc, bc, None,
                                                                   threshold),
            "sp_row_linear_w8a8": lambda: flashcomm.sp_row_linear_w8a8(
                xr, feature_slice(w_q, tp, rank, 1), w_s, None, None, bias, None,
                torch.float32, threshold),
            "sp_column_linear_w8a8": lambda: flashcomm.sp_column_linear_w8a8(
                x_full, wqc, wsc, None, None, bc, None, torch.float32, threshold),
            "sp_add_rms_norm": lambda: flashcomm.sp_add_rms_norm(
                x_full, x_full, bias, 1e-6, None, threshold, True, True),
        }
        return calls[op]
    shard = token_shard(x_full, tp, rank)
    b = feature_slice(bias, tp, rank, 0)
    if op == "ag_gemm":
        wr = feature_slice(w, tp, rank, 0)
        return lambda: flashcomm.ag_gemm(shard, wr, b, None, n, threshold)
    wr, sr = feature_slice(w_q, tp, rank, 0), feature_slice(w_s, tp, rank, 0)
    return lambda: flashcomm.ag_gemm_w8a8(shard, wr, sr, None, None, b, None, n, torch.float32,
                                          threshold)


def soak_on_rank(op: str, calls: int, window: int, warmup: int, tokens: tuple[int, int],
                 hidden: int, threshold: int) -> dict:
    """Runs on every rank: the loop for one op; returns RSS / timing / counters."""
    fns = [_make_call(op, n, hidden, threshold, seed=7) for n in tokens]
    for i in range(warmup):
        fns[i % 2]()
    flashcomm.reset_stats()
    rss0 = rss_mib()
    rss, times = [], []
    t0 = time.perf_counter()
    for i in range(calls):
        fns[i % 2]()
        if (i + 1) % window == 0:
            t1 = time.perf_counter()
            times.append(t1 - t0)
            rss.append(rss_mib())
            t0 = time.perf_counter()
    return {"rss0": rss0, "rss": rss, "times": times, "stats": flashcomm.stats()}


def _slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0..len-1."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2
                                                                      for i in range(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000, help="calls per op (even)")
    p.add_argument("--window", type=int, default=1000, help="calls per measurement window")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs=2, default=(48, 97),
                   help="token counts below / above --threshold, alternated")
    p.add_argument("--threshold", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rss-bound-mib", type=float, default=64.0)
    p.add_argument("--warn-slowdown", type=float, default=1.5)
    args = p.parse_args(argv)
    if args.calls % 2 or args.calls % args.window:
        p.error("--calls must be even and a multiple of --window")
    lo, hi = args.tokens
    if not (lo <= args.threshold < hi):
        p.error("--tokens must straddle --threshold (n <= threshold: sequential)")

    failures: list[str] = []
    print(f"soak: {args.calls} calls per op, tp={args.tp}, tokens {lo}/{hi} alternated, "
          f"threshold {args.threshold}, hidden {args.hidden}, window {args.window}, "
          f"RSS bound +{args.rss_bound_mib:.0f} MiB after {args.warmup} warm-up calls")
    with RankPool(args.tp, timeout_s=600.0, threads_per_rank=1) as pool:
        for op in OPS:
            results = pool.run(soak_on_rank, op, args.calls, args.window, args.warmup,
                               (lo, hi), args.hidden, args.threshold, timeout_s=1800.0)
            print(f"\n{op}")
            header = "  window " + "".join(
                f"| rank{r} RSS MiB  ms/{args.window} " for r in range(args.tp))
            print(header)
            print("  " + "-" * (len(header) - 2))
            print("  warm   " + "".join(f"| {res['rss0']:12.1f}  {'':>8} " for res in results))
            for w in range(len(results[0]["times"])):
                row = "".join(f"| {res['rss'][w]:12.1f}  {res['times'][w] * 1e3:8.1f} "
                              for res in results)
                print(f"  {w + 1:6d} {row}")
            for r, res in enumerate(results):
                growth = max(res["rss"]) - res["rss0"]
                end = res["rss"][-1] - res["rss0"]
                ts = res["times"]
                k = min(3, len(ts))
                ratio = (sum(ts[-k:]) / k) / (sum(ts[:k]) / k)
                slope_pct = 100.0 * _slope(ts) / (sum(ts) / len(ts))
                print(f"  rank {r}: RSS {res['rss0']:.1f} -> {res['rss'][-1]:.1f} MiB "
                      f"(end {end:+.1f}, max growth {growth:+.1f}); time last/first "
                      f"{ratio:.2f}, slope {slope_pct:+.2f}%/window")
                if growth > args.rss_bound_mib:
                    failures.append(f"{op} rank {r}: RSS grew {growth:.1f} MiB "
                                    f"> {args.rss_bound_mib:.0f} MiB")
                if ratio > args.warn_slowdown:
                    print(f"  WARNING {op} rank {r}: last windows {ratio:.2f}x slower "
                          "than the first")
                want = {s: args.calls // 2 for s in paths(op)}
                for other, counts in res["stats"].items():
                    if op.startswith("sp_") and other != op:
                        continue  # sharded sp ops also count the compact kernels they run
                    expect = want if other == op else {s: 0 for s in paths(other)}
                    got = {s: counts.get(s, 0) for s in paths(other)}
                    if got != expect:
                        failures.append(f"{op} rank {r}: counters of {other} are {got}, "
                                        f"expected {expect}")
                if op not in res["stats"]:
                    failures.append(f"{op} rank {r}: no counters for {op}")
    print()
    if failures:
        print("soak FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"soak passed: RSS within +{args.rss_bound_mib:.0f} MiB of the post-warm-up value "
          f"on every rank, counters exact ({args.calls // 2} sequential + "
          f"{args.calls // 2} pipelined per op)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
