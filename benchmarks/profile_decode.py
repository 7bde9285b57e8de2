"""Where vLLM's decode step spends its time, flashcomm on against off: torch-profiler
tables from inside vLLM's TP workers (issue 11: W8A8 decode measured 1.05-1.32x vLLM's).

The engine is ``benchmarks/vllm_bench.py e2e``'s (same checkpoint per kind: Llama-shaped,
hidden 512, intermediate 1536, 4 layers; same engine process, ``vllm_bench_engine.py``;
same environments, ``flashcomm.tools.vllm_engine.vllm_env``; Inductor by default). Per
variant (``off``: vLLM alone; ``on``: FLASHCOMM_VLLM_ALL_REDUCE=1, the all-reduce
through vLLM's communicator; ``on-own``: FLASHCOMM_VLLM_ALL_REDUCE=0, flashcomm's own
transport, the plugin's default on CPU), round robin, the order rotated every round,
one engine process each: ``--warmups`` untimed and ``--repeats`` timed rounds as in e2e
(unprofiled decode step), then ``--profile-repeats`` profiled pairs: in every worker a
CPU ``torch.profiler.profile`` around ``generate(max_tokens=1)`` of the decode batch
(prefill of the 8 prompts + 1 sample), and around ``generate(max_tokens=T)``. Per op
(``key_averages`` key) and rank, one decode step is (many - one) / (T - 1): the same
difference the e2e timing takes, so prefill and per-call costs cancel. By default
(unless ``--no-trace``) the workers also write chrome traces and the per-step tables come
from them instead: the profiled ``generate(max_tokens=T)`` cut into steps at vLLM's
``gpu_model_runner: preprocess`` ranges, the first (prefill) step dropped, per op the mean
over the decode steps (self = duration minus direct children's, per thread): no
subtraction of two noisy runs.

Every engine also gets ``VLLM_CUSTOM_SCOPES_FOR_PROFILING=1`` (vLLM's model-runner phases
``gpu_model_runner: forward`` / ``sample`` / ... appear as ranges: inclusive CPU time per
phase) and, unless ``--no-kernel-profile``, ``TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1``
(each Inductor C++ kernel records itself, so graph kernels are counted and timed; the
same on both sides). Profiling adds overhead per recorded op: compare the variants with
each other, and the profiled step with the unprofiled one printed beside it.

Printed and written (``--txt``, ``--json``): per variant the per-step totals (sum of
self CPU over all ops; vLLM's phases; profiled and unprofiled wall time per step); the
``--top`` ops by self CPU per step on rank 0 (calls per step, self CPU µs per step, the
median over rounds x profile repeats) with on - off per op; the ops that differ most;
and the compiled-graph shape per step (``Torch-Compiled Region`` / ``CompiledFxGraph``
calls, Inductor kernels: distinct and calls).

Set FLASHCOMM_LIB to the library to measure (engines inherit it). Traces (several MB
each) and per-worker tables go under ``--out-dir`` (default /tmp/profile_decode); keep them
out of the repository.

    FLASHCOMM_LIB=... .venv/bin/python benchmarks/profile_decode.py --kind w8a8 \\
        --rounds 2 --txt benchmarks/results/profile_decode_w8a8_cpu2.txt \\
        --json benchmarks/results/profile_decode_w8a8_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_bench as vb  # noqa: E402  (benchmarks/ is not a package)

ENGINE_SCRIPT = vb.ENGINE_SCRIPT
PHASE_PREFIX = "gpu_model_runner: "
# Ranges and wrappers: their self time is small, their inclusive time is what matters.
GRAPH_REGION = re.compile(r"^Torch-Compiled Region")
GRAPH_CALL = re.compile(r"^## Call CompiledFxGraph")
INDUCTOR_KERNEL = re.compile(r"cpp_fused_|cpp_CppMicroGemm|graph_\d+_")

# Pseudo-op: a step's wall time outside vLLM's model-runner phases (waiting for the
# scheduler's next step, IPC, sampling output hand-off).
IDLE = "[worker outside model-runner phases]"
Table = dict[str, dict[str, float]]  # op name -> {"calls", "self_cpu_us", "cpu_us"}


def _load_ops(path: Path) -> Table:
    rows = json.loads(path.read_text())["ops"]
    return {r["name"]: {"calls": float(r["calls"]), "self_cpu_us": float(r["self_cpu_us"]),
                        "cpu_us": float(r["cpu_us"])} for r in rows}


def per_step(one: Table, many: Table, steps: int) -> Table:
    """(many - one) / steps per op and field: one decode step of the batch."""
    out: Table = {}
    for name in set(one) | set(many):
        a, b = one.get(name, {}), many.get(name, {})
        out[name] = {k: (b.get(k, 0.0) - a.get(k, 0.0)) / steps
                     for k in ("calls", "self_cpu_us", "cpu_us")}
    return out


def median_table(tables: list[Table]) -> Table:
    """Per op and field, the median over ``tables`` (a missing op counts 0)."""
    names = set().union(*tables) if tables else set()
    return {n: {k: statistics.median(t.get(n, {}).get(k, 0.0) for t in tables)
                for k in ("calls", "self_cpu_us", "cpu_us")} for n in names}


def trace_steps(path: Path) -> tuple[list[Table], list[float]]:
    """Per decode step tables from one worker's chrome trace of ``generate(max_tokens=T)``.

    Steps are cut at each ``gpu_model_runner: preprocess`` range (from its start to the
    next one's); the first (the prefill of the prompts) is dropped. An op's self time is
    its duration minus its direct children's on the same thread. Returns the tables
    and the steps' wall times (µs)."""
    events = [e for e in json.loads(path.read_text())["traceEvents"]
              if e.get("ph") == "X" and "dur" in e
              and e.get("cat") in ("cpu_op", "user_annotation", "cpu_instant_event",
                                   "python_function", "kernel", None)]
    starts = sorted(float(e["ts"]) for e in events
                    if e["name"] == PHASE_PREFIX + "preprocess")
    if len(starts) < 2:
        return [], []
    bounds = starts + [float("inf")]
    # Self time: per thread, an interval stack.
    by_tid: dict[Any, list[dict[str, Any]]] = {}
    for e in events:
        by_tid.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    selfs: list[tuple[float, str, float, float]] = []  # ts, name, self, dur
    for evs in by_tid.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list[Any]] = []  # [end, event, child_sum]
        done: list[list[Any]] = []
        for e in evs:
            ts, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= ts:
                done.append(stack.pop())
            if stack:
                stack[-1][2] += dur
            stack.append([ts + dur, e, 0.0])
        done.extend(stack)
        for _, e, child in done:
            selfs.append((float(e["ts"]), e["name"], float(e["dur"]) - child,
                          float(e["dur"])))
    tables: list[Table] = [{} for _ in starts]
    import bisect
    for ts, name, self_us, dur in selfs:
        i = bisect.bisect_right(bounds, ts) - 1
        if 0 <= i < len(starts):
            acc = tables[i].setdefault(name, {"calls": 0.0, "self_cpu_us": 0.0,
                                              "cpu_us": 0.0})
            acc["calls"] += 1
            acc["self_cpu_us"] += self_us
            acc["cpu_us"] += dur
    # Closed windows (a next preprocess exists) that ran a forward; the first is prefill.
    keep = [i for i in range(len(starts) - 1)
            if PHASE_PREFIX + "forward" in tables[i]][1:]
    walls = []
    for i in keep:
        wall = bounds[i + 1] - bounds[i]
        phases = sum(v["cpu_us"] for n, v in tables[i].items() if n.startswith(PHASE_PREFIX))
        tables[i][IDLE] = {"calls": 1.0, "self_cpu_us": wall - phases, "cpu_us": wall - phases}
        walls.append(wall)
    return [tables[i] for i in keep], walls


def mean_table(tables: list[Table]) -> Table:
    """Per op and field, the mean over ``tables`` (a missing op counts 0)."""
    names = set().union(*tables) if tables else set()
    return {n: {k: sum(t.get(n, {}).get(k, 0.0) for t in tables) / len(tables)
                for k in ("calls", "self_cpu_us", "cpu_us")} for n in names}


def run_engine(tmp: Path, model: Path, variant: str, round_: int,
               args: argparse.Namespace) -> dict[str, Any]:
    """One profiled engine (vllm_bench_engine.py --profile-dir) in the variant's env."""
    from flashcomm.tools import vllm_engine as tv
    enable, vllm_ar = vb.E2E_VARIANTS[variant]
    env = tv.vllm_env(tmp, enable, args.tp, compile_backend=args.compile)
    env["FLASHCOMM_SP_THRESHOLD"] = str(args.sp_threshold)
    env["FLASHCOMM_VLLM_ALL_REDUCE"] = vllm_ar
    env["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
    if args.kernel_profile:
        env["TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE"] = "1"
    # Per engine: its own Inductor cache (a profiled build never reuses another's kernels).
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor_{variant}_{round_}")
    pdir = Path(args.out_dir) / f"{args.kind}_{variant}_r{round_}"
    pdir.mkdir(parents=True, exist_ok=True)
    out = pdir / "engine.json"
    cmd = [sys.executable, str(ENGINE_SCRIPT), str(model), str(out), "--tp", str(args.tp),
           "--dtype", vb.KIND_DTYPE[args.kind], "--decode-seqs", str(args.decode_seqs),
           "--decode-tokens", str(args.decode_tokens), "--warmups", str(args.warmups),
           "--repeats", str(args.repeats), "--profile-dir", str(pdir),
           "--profile-repeats", str(args.profile_repeats)]
    if args.trace:
        cmd.append("--profile-trace")
    res = vb.run_engine_process(cmd, env, tmp, out, pdir / "engine.log",
                                f"engine {variant} (round {round_})", args.engine_timeout)
    res["pdir"] = str(pdir)
    return res


def engine_steps(res: dict[str, Any], rank: int, steps: int,
                 from_trace: bool) -> tuple[list[Table], list[float]]:
    """Per-step tables of one engine's rank and the steps' wall times (µs; from traces
    only). From the traces: the mean over the decode steps of each profiled
    ``generate(max_tokens=T)``, one table per profile repeat; else (many - one) / steps of
    the key_averages."""
    pdir = Path(res["pdir"])
    n = len(res["profile_ms"]["one"])
    if not from_trace:
        return [per_step(_load_ops(pdir / f"one_{i}_rank{rank}.ops.json"),
                         _load_ops(pdir / f"many_{i}_rank{rank}.ops.json"), steps)
                for i in range(n)], []
    tabs: list[Table] = []
    walls: list[float] = []
    for i in range(n):
        t, w = trace_steps(pdir / f"many_{i}_rank{rank}.trace.json")
        if t:
            tabs.append(mean_table(t))
            walls.extend(w)
    return tabs, walls


def summarise(tab: Table) -> dict[str, Any]:
    """Totals and compiled-graph shape of one per-step table."""
    phases = {n[len(PHASE_PREFIX):]: round(v["cpu_us"], 1) for n, v in tab.items()
              if n.startswith(PHASE_PREFIX)}
    kernels = {n: v for n, v in tab.items() if INDUCTOR_KERNEL.search(n)
               and v["calls"] > 0.5}
    return {
        "self_cpu_us_total": round(sum(v["self_cpu_us"] for n, v in tab.items()
                                       if n != IDLE), 1),
        "outside_phases_us": round(tab.get(IDLE, {}).get("self_cpu_us", 0.0), 1),
        "phases_cpu_us": phases,
        "graph_region_calls": round(sum(v["calls"] for n, v in tab.items()
                                        if GRAPH_REGION.search(n)), 2),
        "compiled_graph_calls": round(sum(v["calls"] for n, v in tab.items()
                                          if GRAPH_CALL.search(n)), 2),
        "compiled_graphs_distinct": sum(1 for n, v in tab.items()
                                        if GRAPH_CALL.search(n) and v["calls"] > 0.5),
        "inductor_kernels_distinct": len(kernels),
        "inductor_kernel_calls": round(sum(v["calls"] for v in kernels.values()), 2),
        "inductor_kernel_self_us": round(sum(v["self_cpu_us"] for v in kernels.values()), 1),
    }


def _kernel_family(name: str) -> str:
    """An Inductor kernel's name without its graph / hash suffix (``cpp_fused_add_mul_3``
    -> ``cpp_fused_add_mul``), so the same kernel in two builds lines up."""
    name = re.sub(r"^graph_\d+_", "", name)
    return re.sub(r"_\d+$", "", name)


def fold_kernels(tab: Table) -> Table:
    """Inductor kernels folded into their families (names differ between builds)."""
    out: Table = {}
    for n, v in tab.items():
        key = f"[inductor] {_kernel_family(n)}" if INDUCTOR_KERNEL.search(n) else n
        if GRAPH_CALL.search(n):
            key = "## Call CompiledFxGraph (all) ##"
        if GRAPH_REGION.search(n):
            key = "Torch-Compiled Region (all)"
        acc = out.setdefault(key, {"calls": 0.0, "self_cpu_us": 0.0, "cpu_us": 0.0})
        for k in acc:
            acc[k] += v[k]
    return out


def format_report(result: dict[str, Any], top: int) -> str:
    variants: list[str] = result["variants"]
    med: dict[str, Table] = result["per_step_rank0"]
    lines: list[str] = [result["head"], ""]
    lines.append("Per decode step (rank 0; medians over rounds x profile repeats):")
    lines.append(f"  {'variant':8} {'self CPU ms':>11} {'forward ms':>10} {'sample ms':>9} "
                 f"{'prof wall ms':>12} {'trace step':>10} {'outside ms':>10} {'unprof ms':>9} "
                 f"{'graphs':>6} {'regions':>7} "
                 f"{'kernels':>7} {'k calls':>7} {'k self ms':>9}")
    for v in variants:
        s = result["summary"][v]
        ph = s["phases_cpu_us"]
        lines.append(
            f"  {v:8} {s['self_cpu_us_total'] / 1e3:11.3f} "
            f"{ph.get('forward', 0.0) / 1e3:10.3f} {ph.get('sample', 0.0) / 1e3:9.3f} "
            f"{s['profiled_wall_ms_per_step']:12.3f} "
            f"{(s['trace_step_wall_us_median'] or 0.0) / 1e3:10.3f} "
            f"{s['outside_phases_us'] / 1e3:10.3f} "
            f"{s['unprofiled_step_ms']:9.3f} "
            f"{s['compiled_graph_calls']:6.1f} {s['graph_region_calls']:7.1f} "
            f"{s['inductor_kernels_distinct']:7d} {s['inductor_kernel_calls']:7.1f} "
            f"{s['inductor_kernel_self_us'] / 1e3:9.3f}")
    lines.append("  (self CPU: sum over every recorded op; forward / sample: vLLM's phase "
                 "ranges, inclusive; prof wall: (t[T] - t[1]) / (T - 1) of the profiled "
                 "calls; trace step: median decode step from the rank-0 trace (preprocess to "
                 "preprocess); outside: mean step time outside the phases (waiting for the "
                 "scheduler); unprof: the engine's e2e-style timed step; graphs: CompiledFxGraph "
                 "calls; kernels: distinct Inductor kernels and their calls)")
    lines.append("")
    lines.append("Model-runner phases, inclusive CPU µs per step (rank 0):")
    phases = sorted({p for v in variants for p in result["summary"][v]["phases_cpu_us"]})
    lines.append("  " + f"{'phase':24}" + "".join(f"{v:>10}" for v in variants))
    for p in phases:
        lines.append("  " + f"{p:24}" + "".join(
            f"{result['summary'][v]['phases_cpu_us'].get(p, 0.0):10.1f}" for v in variants))
    lines.append("")
    base = "off" if "off" in variants else variants[0]
    others = [v for v in variants if v != base]
    names = sorted(set().union(*(med[v] for v in variants)),
                   key=lambda n: -max(med[v].get(n, {}).get("self_cpu_us", 0.0)
                                      for v in variants))
    hdr = f"  {'op (rank 0)':48} " + " ".join(f"{v + ' calls':>11} {v + ' µs':>10}"
                                               for v in variants)
    hdr += "".join(f" {'d ' + v:>10}" for v in others)
    lines.append(f"Top {top} ops by self CPU per decode step (d = variant - {base}, µs):")
    lines.append(hdr)

    def row(n: str) -> str:
        cells = []
        for v in variants:
            e = med[v].get(n, {"calls": 0.0, "self_cpu_us": 0.0})
            cells.append(f"{e['calls']:11.2f} {e['self_cpu_us']:10.1f}")
        d = "".join(f" {med[v].get(n, {}).get('self_cpu_us', 0.0) - med[base].get(n, {}).get('self_cpu_us', 0.0):10.1f}"  # noqa: E501
                    for v in others)
        return f"  {n[:48]:48} " + " ".join(cells) + d

    for n in names[:top]:
        lines.append(row(n))
    for v in others:
        diffs = sorted(set(med[v]) | set(med[base]),
                       key=lambda n: -abs(med[v].get(n, {}).get("self_cpu_us", 0.0)
                                          - med[base].get(n, {}).get("self_cpu_us", 0.0)))
        lines.append("")
        lines.append(f"Ops that differ most, {v} - {base} (self CPU µs per step, rank 0):")
        lines.append(hdr)
        for n in diffs[:top]:
            lines.append(row(n))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="profile_decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=vb.KINDS, default="w8a8",
                   help="checkpoint kind (default w8a8)")
    p.add_argument("--variants", default="off,on-own,on",
                   help="comma list of off,on,on-own (default all three)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds; one engine per variant each (default 2)")
    p.add_argument("--warmups", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed (unprofiled) e2e rounds per engine (default 3)")
    p.add_argument("--profile-repeats", type=int, default=2,
                   help="profiled (max_tokens=1, max_tokens=T) pairs per engine (default 2)")
    p.add_argument("--preset", default=None, choices=("qwen3-0.6b", "llama-3.2-1b"),
                   help="a real model's width (scripts/make_tiny_checkpoint.py --preset) "
                   "instead of e2e's Llama hidden 512 (issue 22)")
    p.add_argument("--num-layers", type=int, default=4,
                   help="depth of the --preset checkpoint (default 4)")
    p.add_argument("--decode-seqs", type=int, default=8, help="default 8")
    p.add_argument("--decode-tokens", type=int, default=33, help="T (default 33)")
    p.add_argument("--sp-threshold", type=int, default=1000, help="default 1000")
    p.add_argument("--compile", choices=("inductor", "eager"), default="inductor",
                   help="vLLM's compile backend (default inductor, as e2e)")
    p.add_argument("--no-kernel-profile", dest="kernel_profile", action="store_false",
                   help="do not set TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="no chrome traces: per step = (many - one) / (T - 1) of the "
                   "key_averages instead of the mean over the traced decode steps")
    p.add_argument("--tp", type=int, default=2, help="default 2")
    p.add_argument("--top", type=int, default=25, help="ops per table (default 25)")
    p.add_argument("--out-dir", default="/tmp/profile_decode",
                   help="per-engine folders: logs, worker tables, traces")
    p.add_argument("--engine-timeout", type=int, default=1800, help="seconds (default 1800)")
    p.add_argument("--txt", default=None, help="write the printed tables here")
    p.add_argument("--json", default=None, help="write per-step tables and summaries here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in vb.E2E_VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {list(vb.E2E_VARIANTS)}")
    sys.path.insert(0, str(vb.ROOT / "python"))
    machine = vb.machine_info()
    load_before = vb.load_average()
    t_start = time.time()
    steps = args.decode_tokens - 1
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.preset:
        vb.E2E_MODEL_ARGS = ("--preset", args.preset, "--num-layers", str(args.num_layers))
        model_name = f"{args.preset} width, {args.num_layers} layers"
        model = out_dir / f"{args.preset}-{args.num_layers}l-{args.kind}"
    else:
        model_name = "Llama hidden 512, 4 layers"
        model = out_dir / f"llama512-{args.kind}"
    if not (model / "config.json").exists():
        vb._make_checkpoint(model, args.kind)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    per_rank: dict[str, dict[int, list[Table]]] = {v: {} for v in variants}
    step_walls: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            res = run_engine(out_dir, model, v, r, args)
            prof = res["profile_ms"]
            res["profiled_wall_ms_per_step"] = statistics.median(
                (m - o) / steps for o, m in zip(prof["one"], prof["many"]))
            res["load"] = vb.load_average()
            for rank in range(args.tp):
                tabs, walls = engine_steps(res, rank, steps, args.trace)
                per_rank[v].setdefault(rank, []).extend(tabs)
                if rank == 0 and walls:
                    res["trace_step_wall_us_median"] = statistics.median(walls)
                    step_walls[v].extend(walls)
            res.pop("workers", None)
            runs[v].append(res)
            print(f"  round {r} {v:7} decode step {res['decode_step_ms_median']:7.3f} ms "
                  f"unprofiled, {res['profiled_wall_ms_per_step']:7.3f} ms profiled "
                  f"(engine {res['wall_s']} s, load {vb._fmt_load(res['load'])})", flush=True)
    load_after = vb.load_average()
    per_step_rank0 = {v: fold_kernels(median_table(per_rank[v][0])) for v in variants}
    summary: dict[str, Any] = {}
    for v in variants:
        s = summarise(median_table(per_rank[v][0]))
        s["rank1"] = summarise(median_table(per_rank[v].get(1, per_rank[v][0])))
        s["unprofiled_step_ms"] = statistics.median(x["decode_step_ms_median"]
                                                    for x in runs[v])
        s["profiled_wall_ms_per_step"] = statistics.median(x["profiled_wall_ms_per_step"]
                                                           for x in runs[v])
        s["per_round_unprofiled_ms"] = [round(x["decode_step_ms_median"], 3) for x in runs[v]]
        s["per_round_profiled_ms"] = [round(x["profiled_wall_ms_per_step"], 3)
                                      for x in runs[v]]
        s["trace_step_wall_us_median"] = (statistics.median(step_walls[v])
                                          if step_walls[v] else None)
        summary[v] = s
    head = (f"profile_decode: kind {args.kind}, {model_name}, tp={args.tp}, "
            f"compile {args.compile}, decode step of {args.decode_seqs} sequences "
            f"((t[{args.decode_tokens}] - t[1]) / {steps}), {args.rounds} rounds x "
            f"{args.profile_repeats} profiled pairs per variant, kernel profile "
            f"{'on' if args.kernel_profile else 'off'}; {time.time() - t_start:.0f} s\n"
            f"{vb.machine_line(machine)}\nload average before {vb._fmt_load(load_before)}, "
            f"after {vb._fmt_load(load_after)}; FLASHCOMM_LIB="
            f"{os.environ.get('FLASHCOMM_LIB')}\n"
            + "\n".join(f"  {v:7} unprofiled step per round {summary[v]['per_round_unprofiled_ms']}"
                        f" ms, profiled {summary[v]['per_round_profiled_ms']} ms"
                        for v in variants))
    result = {"head": head, "variants": variants, "summary": summary,
              "per_step_rank0": per_step_rank0,
              "settings": {k: v for k, v in vars(args).items()},
              "machine": machine, "load_before": load_before, "load_after": load_after,
              "runs": runs}
    text = format_report(result, args.top)
    print(text)
    if args.txt:
        Path(args.txt).write_text(text + "\n")
    if args.json:
        # Only ops that matter (the full per-step tables stay under --out-dir).
        keep = {n for v in variants for n, e in per_step_rank0[v].items()
                if abs(e["self_cpu_us"]) >= 0.5 or abs(e["calls"]) >= 0.5}
        result["per_step_rank0"] = {v: {n: {k: round(x, 2) for k, x in e.items()}
                                        for n, e in t.items() if n in keep}
                                    for v, t in per_step_rank0.items()}
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
