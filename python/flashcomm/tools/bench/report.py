"""`flashcomm bench`'s output: the text report, the plot (PNG) and the JSON document."""

from __future__ import annotations

from typing import Any

import flashcomm
from flashcomm import tuning
from flashcomm._atomic_write import write_json_atomic
from .metrics import fmt_threshold, repeats_at


def format_report(result: dict[str, Any]) -> str:
    """The result document of :func:`~flashcomm.tools.bench.run_bench` as text tables:
    per op and n, the GEMM, chunking, byte and model tables, then a summary per op."""
    m, c = result["machine"], result["config"]
    lines = [
        f"flashcomm {m['flashcomm']} bench: tp={m.get('world_size')} CPU ranks over gloo; "
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
        f"threads/rank {[r['torch_threads'] for r in m.get('ranks', [])]}, "
        f"load avg start {m['loadavg']} end {m.get('loadavg_end')}",
        f"{c['dtype']}; median of {c['repeats']} repeats ({repeats_at(c['repeats'], 512)} for ops "
        f"at n <= 512) "
        f"after {c['warmup']} warm-up, per repeat "
        f"the slowest rank; variants interleaved in one run; pipeline config "
        f"(max_chunks, min_chunk_rows) = {tuple(result['pipeline_config'])}; tuning table: "
        f"{result['table']['path'] or f'none (auto = {flashcomm.DEFAULT_THRESHOLD})'}",
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
                     f" auto threshold {fmt_threshold(rows[0]['auto_threshold'])})")
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
                     f"{fmt_threshold(result['model_sp_threshold'])}, kernel threshold auto (ms)")
        lines.append(f"{'n':>6}{'plain TP':>10}{'fc auto':>10}{'fc shard':>10}{'fc repl':>10}"
                     f"{'auto/TP':>9}{'shard/TP':>9}  mode")
        for r in result["model"]:
            lines.append(f"{r['n']:>6}{r['tp_ms']:>10.2f}{r['flashcomm_ms']:>10.2f}"
                         f"{r['sharded_ms']:>10.2f}{r['replicated_ms']:>10.2f}"
                         f"{r['flashcomm_vs_tp']:>9.2f}{r['sharded_vs_tp']:>9.2f}  {r['mode']}")
        lines.append(f"crossover (sharded beats plain TP at every larger measured n): n > "
                     f"{fmt_threshold(result['model_crossover'])}")
        lines.append("")
    s = result["summary"]
    for op in (o for o in tuning.OPS if o in s):
        v = s[op]
        eff = v["max_overlap_efficiency"]
        ovh = v["small_n_overhead_ms"]
        lines.append(f"{op:<13} overlap eff (max, n>=1024) "
                     f"{'-' if eff is None else f'{eff:.2f}'}; best pipe/seq "
                     f"{v['best_pipe_vs_seq']:.2f}; seq-py overhead n<=16 "
                     f"{'-' if ovh is None else f'{ovh:.3f} ms'}; seq->pipe crossover "
                     f"{fmt_threshold(v['seq_crossover'])}; auto/best worst "
                     f"{v['worst_auto_vs_best']:.3f} (within 5% at "
                     f"{v['auto_within_5pct_at']}/{v['points']}; picks the faster at "
                     f"{v['auto_picks_best_at']}/{v['points']}; its choice within 5% of the "
                     f"faster at {v['choice_within_5pct_at']}/{v['points']}, worst "
                     f"{v['worst_choice_vs_best']:.3f}; same-path noise up to "
                     f"{v['noise_auto_vs_same_max']:.0%})")
    lines.append(f"elapsed {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: str) -> None:
    """Latency vs n per op (every variant) and for the model, as a PNG."""
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
    """Writes the result document atomically (values JSON cannot hold as their str)."""
    write_json_atomic(path, result, indent=1, default=str)
