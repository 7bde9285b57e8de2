"""Fused add + RMSNorm on CPU: flashcomm's kernel against vLLM's and the old ATen composite.

Per dtype, thread count, n and H, the median µs per call of:

* ``op``: ``torch.ops.flashcomm.sp_add_rms_norm`` on a 1-rank gloo group (tp = 1,
  replicated), so the op's own overhead (group lookup, mode decision, two output
  allocations) is included;
* ``kernel``: flashcomm's ``ops::add_rms_norm_rows`` alone, into preallocated
  outputs, through a small custom op compiled at start-up (``--no-kernel`` skips it;
  it needs a C++ compiler and the repository's headers);
* ``vllm``: vLLM's in-place ``torch.ops._C.fused_add_rms_norm``, when vLLM is
  importable;
* ``aten``: the composite the op used before the kernel (add, pow, mean, rsqrt, mul,
  casts: eager ATen called from Python, so it also pays Python dispatch per op);

* ``inplace``: the same kernel writing normed into x and residual_out into residual,
  i.e. vLLM's memory traffic (the op itself is functional and cannot do this);

Before every timed call (untimed) the inputs are rewritten from pristine copies, so
each method starts with its inputs hot in cache, as after the layer that produced
them, and the in-place kernels see fresh values. Methods run round-robin within
each shape (``--rounds`` rounds of ``--min-time`` each) to share the machine's
noise; the table gives ``op / vllm``, ``kernel / vllm`` and ``inplace / vllm``.
Not a test: figures from a shared machine are rough.

    FLASHCOMM_LIB=$PWD/build/norm/libflashcomm_ops.so \\
      .venv/bin/python benchmarks/norm_bench.py --json /tmp/norm_bench.json
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

import flashcomm  # noqa: F401  (registers torch.ops.flashcomm)
from flashcomm import _loader

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ["op", "kernel", "inplace", "vllm", "aten"]

logger = logging.getLogger("norm_bench")

_KERNEL_SOURCE = r"""
#include <torch/library.h>

#include "ops/norm.h"

namespace {
void add_rms_norm_rows(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const at::Tensor& weight, double eps, const at::Tensor& normed,
                       const at::Tensor& residual_out) {
  flashcomm::ops::add_rms_norm_rows(x, residual, weight, eps, normed, residual_out);
}
}  // namespace

TORCH_LIBRARY(flashcomm_norm_bench, m) {
  m.def("add_rms_norm_rows(Tensor x, Tensor? residual, Tensor weight, float eps, "
        "Tensor(a!) normed, Tensor(b!) residual_out) -> ()");
  m.impl("add_rms_norm_rows", c10::DispatchKey::CPU, &add_rms_norm_rows);
}
"""


def load_kernel_op() -> Optional[Callable[..., None]]:
    """torch.ops.flashcomm_norm_bench.add_rms_norm_rows (flashcomm's kernel entry,
    linked against the loaded libflashcomm_ops.so), or None if it cannot be built."""
    from torch.utils.cpp_extension import load_inline
    lib = _loader.library_path().resolve()
    try:
        load_inline(
            name="flashcomm_norm_bench", cpp_sources=[_KERNEL_SOURCE], is_python_module=False,
            extra_include_paths=[str(ROOT / "csrc")],
            extra_ldflags=[f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"],
            extra_cflags=["-O2"], verbose=False)
    except Exception as exc:  # no compiler / headers: the other columns still run
        logger.warning("bare kernel column skipped: %s: %s", type(exc).__name__, exc)
        return None
    return torch.ops.flashcomm_norm_bench.add_rms_norm_rows


def load_vllm_op() -> Optional[Callable[..., None]]:
    """vLLM's in-place fused_add_rms_norm(input, residual, weight, eps), or None."""
    try:
        import vllm._custom_ops  # noqa: F401
        return torch.ops._C.fused_add_rms_norm
    except Exception as exc:
        logger.warning("vllm column skipped: %s: %s", type(exc).__name__, exc)
        return None


def aten_composite(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-kernel expression of csrc/ops/norm.cpp, in eager ATen."""
    s = x.float() + residual.float()
    residual_out = s.to(x.dtype)
    normed = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return torch.mul(normed, weight.to(x.dtype)), residual_out


def per_call_us(call: Callable[[], object], min_time_s: float, min_calls: int = 5,
                before: Optional[Callable[[], None]] = None) -> list[float]:
    """Per-call µs for at least min_time_s (and min_calls); `before` runs untimed."""
    times: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < min_calls or time.perf_counter() < deadline:
        if before is not None:
            before()
        t0 = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def bench_shape(dtype: torch.dtype, n: int, hidden: int, group_name: str, ops: dict,
                rounds: int, min_time_s: float) -> dict[str, float]:
    """Median µs per method for one shape (round-robin over methods)."""
    g = torch.Generator().manual_seed(n * 7919 + hidden)
    x_src = torch.randn(n, hidden, generator=g).to(dtype)
    residual_src = (4 * torch.randn(n, hidden, generator=g)).to(dtype)
    weight = (1 + 0.25 * torch.randn(hidden, generator=g)).to(dtype)
    x, residual = x_src.clone(), residual_src.clone()
    normed, residual_out = torch.empty_like(x), torch.empty_like(x)

    def refresh_inputs() -> None:
        # Every method starts from the same cache state: inputs just written (as
        # by the layer before), which vLLM's in-place kernel needs anyway.
        x.copy_(x_src)
        residual.copy_(residual_src)

    calls: dict[str, Callable[[], object]] = {
        "op": lambda: torch.ops.flashcomm.sp_add_rms_norm(
            x, residual, weight, EPS, group_name, 1 << 30, True, False),
        "aten": lambda: aten_composite(x, residual, weight),
    }
    if ops.get("kernel") is not None:
        calls["kernel"] = lambda: ops["kernel"](x, residual, weight, EPS, normed, residual_out)
        calls["inplace"] = lambda: ops["kernel"](x, residual, weight, EPS, x, residual)
    if ops.get("vllm") is not None:
        calls["vllm"] = lambda: ops["vllm"](x, residual, weight, EPS)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up: first-touch pages, lazy init
        per_call_us(call, 0.0, min_calls=3, before=refresh_inputs)
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name].extend(per_call_us(call, min_time_s, before=refresh_inputs))
    return {name: statistics.median(v) for name, v in samples.items()}


def init_group() -> str:
    store = dist.FileStore(str(Path(tempfile.mkdtemp(prefix="norm_bench_")) / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return dist.group.WORLD.group_name


def parse_list(text: str, cast=int) -> list:
    return [cast(v) for v in text.split(",") if v]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,bf16", help="of %s" % ",".join(DTYPES))
    parser.add_argument("--tokens", default="1,8,64,2048", help="n values")
    parser.add_argument("--hidden", default="512,640,1024,4096", help="H values")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds per shape")
    parser.add_argument("--min-time", type=float, default=0.02,
                        help="seconds per method per round (default 0.02)")
    parser.add_argument("--no-kernel", action="store_true",
                        help="skip the bare-kernel column (no C++ compile)")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM's kernel")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    ops = {"kernel": None if args.no_kernel else load_kernel_op(),
           "vllm": None if args.no_vllm else load_vllm_op()}
    group_name = init_group()
    rows = []
    header = (f"{'dtype':>5} {'thr':>3} {'n':>5} {'H':>5} | "
              + " ".join(f"{m:>9}" for m in METHODS)
              + f" | {'op/vllm':>7} {'krn/vllm':>8} {'inp/vllm':>8} {'aten/op':>7}")
    print(f"# torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, median µs per call")
    print(header)
    print("-" * len(header))
    try:
        for dtype_name in parse_list(args.dtypes, str):
            dtype = DTYPES[dtype_name]
            for threads in parse_list(args.threads):
                torch.set_num_threads(threads)
                for n in parse_list(args.tokens):
                    for hidden in parse_list(args.hidden):
                        us = bench_shape(dtype, n, hidden, group_name, ops, args.rounds,
                                         args.min_time)
                        row = {"dtype": dtype_name, "threads": threads, "n": n, "H": hidden,
                               **{f"{k}_us": v for k, v in us.items()}}
                        rows.append(row)

                        def cell(name: str) -> str:
                            return f"{us[name]:9.2f}" if name in us else f"{'-':>9}"

                        def ratio(a: str, b: str, width: int) -> str:
                            ok = a in us and b in us
                            return f"{us[a] / us[b]:{width}.2f}" if ok else f"{'-':>{width}}"

                        print(f"{dtype_name:>5} {threads:>3} {n:>5} {hidden:>5} | "
                              + " ".join(cell(m) for m in METHODS)
                              + f" | {ratio('op', 'vllm', 7)} {ratio('kernel', 'vllm', 8)} "
                              f"{ratio('inplace', 'vllm', 8)} {ratio('aten', 'op', 7)}",
                              flush=True)
    finally:
        dist.destroy_process_group()
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
