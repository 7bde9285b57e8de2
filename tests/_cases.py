"""Shared case lists and worker-side helpers of the op tests."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

import flashcomm

TPS = [1, 2, 4]
DTYPES = [torch.float32, torch.bfloat16]
THRESHOLD = 1000
# Relative error bounds against the float64 dense reference, per output dtype.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def token_counts(tp: int) -> list[int]:
    """0, 1, tp-1, tp+1, small, both sides of the default threshold, and a prime."""
    return sorted({0, 1, max(tp - 1, 0), tp + 1, 7, 999, 1000, 1001, 2053})


def expected_strategy(n: int, tp: int, threshold: int, enabled: bool = True) -> str:
    """The library's strategy rule (csrc/core/policy.cpp), asked through its op."""
    return str(torch.ops.flashcomm.strategy(n, tp, threshold, enabled))


def assert_ran(counts: dict[str, int], strategy: str, calls: int = 1) -> None:
    other = "sequential" if strategy == "pipelined" else "pipelined"
    assert counts[strategy] == calls and counts[other] == 0, (
        f"expected {calls} {strategy} call(s), counters say {counts}"
    )


def error_of(fn, *args, **kwargs) -> str:
    """The RuntimeError text of ``fn(*args, **kwargs)``, or ``"<no error>"``."""
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:
        return str(e)
    return "<no error>"


def with_env(env: dict[str, str], fn, *args):
    """fn(*args) with ``env`` set in this rank (read when a fresh group is first used)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rank_and_size() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def call_and_count(op_name: str, fn, *args, **kwargs):
    """Runs one op call on this rank; returns (output, that op's counters)."""
    flashcomm.reset_stats()
    out = fn(*args, **kwargs)
    return out, flashcomm.stats()[op_name]


def linear_inputs(n: int, k: int, out_features: int, dtype: torch.dtype, with_bias: bool,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]:
    """Full (all-rank) x [n, k], weight [out_features, k] (nn.Linear layout) and bias."""
    g = torch.Generator().manual_seed(seed + n)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = (torch.randn(out_features, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    return x, w, b


def run_cli(*args: str, cwd, timeout_s: int = 600) -> str:
    """``python -m flashcomm <args>`` in a subprocess; asserts success, returns stdout."""
    proc = subprocess.run([sys.executable, "-m", "flashcomm", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
