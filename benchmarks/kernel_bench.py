"""Per-rank GEMMs of the flashcomm linear ops on CPU: plain vs packed weights, and
W8A8 (fused quantise / dequantise) against the FP linears and vLLM's kernels.

Every flashcomm figure is one call of the public op at tp = 1 on a 1-rank gloo
group (``gemm_rs`` / ``gemm_rs_w8a8``), so the op's own overhead is included. Median
µs per call, one thread, methods run round-robin (``--rounds`` rounds of
``--min-time`` s each) so they share the machine's noise:

FP (per dtype):
* ``mm``: the op on the plain weight (at::mm_out);
* ``packed``: the op on the weight packed by ``flashcomm.weights.prepare_linear``
  (torch's oneDNN ``mkldnn::_linear_pointwise``);
* ``vllm``: vLLM's ``onednn_mm`` on its own packed handle; ``vllm_sgl``: vLLM's
  ``weight_packed_linear`` (bf16), where vLLM is importable.

W8A8 (x and output in ``--w8a8-dtype``; dynamic per-token activations, per-channel
int8 weights):
* ``before``: the ATen composition the op ran before the fused kernels (about ten
  element-wise passes around ``torch._int_mm``), called from Python;
* ``plain`` / ``packed``: the op on the plain int8 weight (``_int_mm``) / on the
  packed one (oneDNN ``qlinear_pointwise``), with the fused kernels;
* ``vllm``: vLLM's ``int8_scaled_mm_with_quant`` (quantisation included).

The ratios: ``fp32/w8a8`` = the fp32 linear (the faster of mm / packed) over the
W8A8 op (packed if the CPU packs int8, else plain); ``w8a8/before``. Not a test:
figures from a shared machine are rough.

With ``FLASHCOMM_LIB`` pointing at a build of an older flashcomm (before the
prepare step) the packed columns stay empty and ``w8a8_plain`` times that build's
W8A8 op, e.g. the unfused one the ``before`` column re-enacts from Python.

    FLASHCOMM_LIB=$PWD/build/gemm/libflashcomm_ops.so \\
      .venv/bin/python benchmarks/kernel_bench.py --json /tmp/kernel_bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

import flashcomm
from flashcomm.tools.reference import quantize_weight_per_channel
from flashcomm.weights import packing_supported, prepare_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHAPES = ["512x1536", "1536x512", "4096x4096"]
DEFAULT_TOKENS = [1, 8, 16, 64, 128, 512, 2048]

logger = logging.getLogger("kernel_bench")


def can_pack(dtype: torch.dtype) -> bool:
    """True if the loaded library has the prepare step and this CPU packs `dtype`
    (an older library, e.g. the one before the prepare step, times plain weights only)."""
    return hasattr(torch.ops.flashcomm, "prepare_linear_weight") and packing_supported(dtype)


def load_vllm() -> bool:
    """Loads vLLM's CPU ops (torch.ops._C) if vLLM is importable."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
    except Exception as e:  # noqa: BLE001  (any import failure means: no vLLM here)
        logger.info("vLLM not importable (%s): its columns stay empty", e)
        return False
    return hasattr(torch.ops, "_C") and hasattr(torch.ops._C, "int8_scaled_mm_with_quant")


def time_round_robin(methods: dict[str, Callable[[], object]], rounds: int,
                     min_time: float) -> dict[str, float]:
    """Median µs per call of each method; each round runs every method for at
    least `min_time` seconds (one warm-up call first)."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    for _ in range(rounds):
        for name, fn in methods.items():
            end = time.perf_counter() + min_time
            while True:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e6)
                if t0 >= end and len(samples[name]) >= 3:
                    break
    return {name: statistics.median(v) for name, v in samples.items()}


def w8a8_before(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The dynamic per-token W8A8 linear as the op computed it before the fused
    kernels: ATen passes around torch._int_mm."""
    xf = x.to(torch.float32)
    absmax = xf.abs().amax(dim=1, keepdim=True)
    absmax = torch.where(xf.isnan().any(1, True), torch.full_like(absmax, float("nan")), absmax)
    scale = absmax / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.nan_to_num(torch.round(xf / safe), 0.0, 127.0, -127.0), -127.0,
                    127.0).to(torch.int8)
    acc = torch._int_mm(q, w_q.t())
    y = acc.to(torch.float32)
    y.mul_(scale)
    y.mul_(w_scale.reshape(1, -1))
    out = torch.empty(y.shape, dtype=out_dtype)
    out.copy_(y)
    return out


def fp_methods(x: torch.Tensor, w: torch.Tensor, group: str,
               vllm: bool) -> dict[str, Callable[[], object]]:
    methods: dict[str, Callable[[], object]] = {"mm": lambda: flashcomm.gemm_rs(x, w, None, group)}
    if can_pack(w.dtype):
        packed = prepare_linear(w, pack=True)
        methods["packed"] = lambda: flashcomm.gemm_rs(x, packed, None, group)
    if vllm:
        from vllm import _custom_ops as vllm_ops
        handle = vllm_ops.create_onednn_mm(w.t(), 32)
        methods["vllm"] = lambda: vllm_ops.onednn_mm(handle, x, None)
        if w.dtype == torch.bfloat16:
            sgl = torch.ops._C.convert_weight_packed(w)
            out = torch.empty(x.shape[0], w.shape[0], dtype=w.dtype)
            methods["vllm_sgl"] = lambda: torch.ops._C.weight_packed_linear(out, x, sgl, None,
                                                                            True)
    return methods


def w8a8_methods(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, group: str,
                 vllm: bool) -> dict[str, Callable[[], object]]:
    dtype = x.dtype
    methods: dict[str, Callable[[], object]] = {
        "before": lambda: w8a8_before(x, w_q, w_scale, dtype),
        "plain": lambda: flashcomm.gemm_rs_w8a8(x, w_q, w_scale, None, None, None, group, dtype),
    }
    if can_pack(torch.int8):
        packed = prepare_linear(w_q, pack=True)
        methods["packed"] = lambda: flashcomm.gemm_rs_w8a8(x, packed, w_scale, None, None, None,
                                                           group, dtype)
    if vllm and dtype == torch.bfloat16:  # vLLM's fused kernel takes bf16 (or fp16) x
        sgl = torch.ops._C.convert_weight_packed(w_q)
        methods["vllm"] = lambda: torch.ops._C.int8_scaled_mm_with_quant(x, sgl, w_scale, None,
                                                                         dtype, True)
    return methods


def parse_shape(text: str) -> tuple[int, int]:
    k, n = text.lower().split("x")
    return int(k), int(n)


def run(args: argparse.Namespace, group: str) -> list[dict]:
    vllm = not args.no_vllm and load_vllm()
    rows = []
    for shape in args.shapes:
        K, N = parse_shape(shape)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(N, K, generator=g) / K**0.5
        w_q, w_scale = quantize_weight_per_channel(w)
        for n in args.tokens:
            if n * K * N > args.max_macs:
                continue
            x = torch.randn(n, K, generator=g)
            row: dict = {"K": K, "N": N, "n": n}
            for name in args.fp_dtypes:
                dtype = DTYPES[name]
                times = time_round_robin(fp_methods(x.to(dtype), w.to(dtype), group, vllm),
                                         args.rounds, args.min_time)
                row.update({f"{name}_{m}": t for m, t in times.items()})
            w8_dtype = DTYPES[args.w8a8_dtype]
            times = time_round_robin(w8a8_methods(x.to(w8_dtype), w_q, w_scale, group, vllm),
                                     args.rounds, args.min_time)
            row.update({f"w8a8_{m}": t for m, t in times.items()})
            fp32 = min(v for k, v in row.items() if k.startswith("fp32_") and k[5:] in
                       ("mm", "packed")) if "fp32" in args.fp_dtypes else None
            w8a8 = row.get("w8a8_packed", row["w8a8_plain"])
            row["fp32/w8a8"] = fp32 / w8a8 if fp32 else None
            row["w8a8/before"] = w8a8 / row["w8a8_before"]
            rows.append(row)
            print_row(row, args, header=len(rows) == 1)
    return rows


def columns(args: argparse.Namespace) -> list[str]:
    cols = []
    for name in args.fp_dtypes:
        cols += [f"{name}_mm", f"{name}_packed", f"{name}_vllm"]
        if name == "bf16":
            cols.append("bf16_vllm_sgl")
    cols += ["w8a8_before", "w8a8_plain", "w8a8_packed", "w8a8_vllm", "fp32/w8a8", "w8a8/before"]
    return cols


def print_row(row: dict, args: argparse.Namespace, header: bool) -> None:
    cols = columns(args)
    if header:
        print(f"# median µs per call, 1 thread; w8a8 x/out {args.w8a8_dtype}; shared machine: "
              "rough", flush=True)
        print(f"{'K x N':>11} {'n':>5} " + " ".join(f"{c:>13}" for c in cols), flush=True)
    cells = []
    for c in cols:
        v = row.get(c)
        cells.append(f"{'-':>13}" if v is None else
                     (f"{v:13.2f}" if "/" in c else f"{v:13.1f}"))
    print(f"{row['K']:>5}x{row['N']:<5} {row['n']:>5} " + " ".join(cells), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                        help="K x N of the weight [N, K], e.g. 512x1536 (default: %(default)s)")
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS,
                        help="token counts n (default: %(default)s)")
    parser.add_argument("--fp-dtypes", nargs="*", default=["fp32", "bf16"],
                        choices=list(DTYPES), help="FP linears to time (default: %(default)s)")
    parser.add_argument("--w8a8-dtype", default="fp32", choices=list(DTYPES),
                        help="x and output dtype of the W8A8 linears (default: %(default)s; "
                        "vLLM's fused kernel runs for bf16 only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (default: 3)")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds per method per round (default: %(default)s)")
    parser.add_argument("--max-macs", type=float, default=4e9,
                        help="skip shapes with n*K*N above this (default: %(default)g)")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM's kernels")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", 1), rank=0,
                                world_size=1)
        try:
            with torch.no_grad():
                rows = run(args, dist.group.WORLD.group_name)
        finally:
            dist.destroy_process_group()
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
