"""Command line: ``flashcomm <command>`` (also ``python -m flashcomm``)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def _tokens(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("token counts must be >= 0")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashcomm",
        description="Token-count-adaptive tensor-parallel communication ops for LLM "
        "inference (GEMM + reduce-scatter, all-gather + GEMM; FP and W8A8).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run every op on CPU ranks over gloo and compare with a dense reference",
        description="Spawns --tp CPU ranks in a gloo group on loopback, runs gemm_rs, "
        "ag_gemm and their W8A8 forms at each token count, and prints which strategy "
        "ran (sequential or pipelined), the error against a dense single-process "
        "reference and the median latency.",
    )
    from flashcomm.demo import DemoConfig

    d = DemoConfig()
    demo.add_argument("--tp", type=_positive, default=d.tp, help="ranks (default %(default)s)")
    demo.add_argument("--tokens", type=_tokens, default=d.tokens,
                      help="comma-separated token counts (default %(default)s)")
    demo.add_argument("--hidden", type=_positive, default=d.hidden,
                      help="hidden size H of the [H, H] weights; divisible by --tp "
                      "(default %(default)s)")
    demo.add_argument("--threshold", type=int, default=d.threshold,
                      help="pipelined iff n > threshold; < 0 = auto (default %(default)s)")
    demo.add_argument("--repeats", type=_positive, default=d.repeats,
                      help="timed repeats per point (default %(default)s)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from flashcomm.demo import DemoConfig, format_table, run_demo

        if args.hidden % args.tp:
            print(f"flashcomm demo: --hidden {args.hidden} is not divisible by --tp {args.tp}",
                  file=sys.stderr)
            return 2
        cfg = DemoConfig(tp=args.tp, tokens=args.tokens, hidden=args.hidden,
                         threshold=args.threshold, repeats=args.repeats)
        print(format_table(run_demo(cfg), cfg))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
