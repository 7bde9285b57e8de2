"""Command line: ``flashcomm <command>`` (also ``python -m flashcomm``)."""

from __future__ import annotations

import argparse
import logging
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(args)
    return 2


def _demo(args: argparse.Namespace) -> int:
    if args.ops:
        from flashcomm.demo import DemoConfig, format_table, run_demo

        if args.hidden % args.tp:
            print(f"flashcomm demo: --hidden {args.hidden} is not divisible by --tp {args.tp}",
                  file=sys.stderr)
            return 2
        cfg = DemoConfig(tp=args.tp, tokens=args.tokens, hidden=args.hidden,
                         threshold=args.threshold if args.threshold >= 0 else 1000,
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
