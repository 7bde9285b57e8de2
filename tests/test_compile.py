"""torch.compile: one graph for every token count, the strategy decided at run
time inside the ops (both strategies run in the compiled graph), outputs equal
to eager, and the Meta kernels' checks active while tracing."""

from __future__ import annotations

import pytest
import torch

import flashcomm
from flashcomm.tools.reference import feature_slice, quantize_weight_per_channel

from _cases import THRESHOLD, rank_and_size

K, H, N = 32, 48, 64
# Crosses the threshold upwards and downwards, starting at 1 (0/1 sizes are
# where dynamo would specialise if the batch dim were not left unbacked).
TOKEN_SEQUENCE = [1, 2, 7, 999, 1000, 1001, 3000, 1500, 1000, 3, 1, 2053]


def _compact_pair(x, w1, w2, w1_q, w1_s, w2_q, w2_s, group_name: str, threshold: int):
    """gemm_rs -> ag_gemm in FP and in W8A8: every op of the library once."""
    n = x.size(0)
    h = torch.ops.flashcomm.gemm_rs(x, w1, None, group_name, threshold, True)
    y = torch.ops.flashcomm.ag_gemm(h, w2, None, group_name, n, threshold, True, False)
    hq = torch.ops.flashcomm.gemm_rs_w8a8(x, w1_q, w1_s, None, None, None, group_name,
                                          torch.float32, threshold, True)
    yq = torch.ops.flashcomm.ag_gemm_w8a8(hq, w2_q, w2_s, None, None, None, group_name, n,
                                          torch.float32, threshold, True, False)
    return y, yq


def _compile_on_rank(backend: str, sequence: list[int]):
    from torch._dynamo.decorators import mark_unbacked
    from torch._dynamo.testing import CompileCounterWithBackend

    rank, tp = rank_and_size()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    w1 = feature_slice(torch.randn(H, K, generator=g) / K**0.5, tp, rank, dim=1)
    w2 = feature_slice(torch.randn(N, H, generator=g) / H**0.5, tp, rank, dim=0)
    w1_q, w1_s = quantize_weight_per_channel(w1)
    w2_q, w2_s = quantize_weight_per_channel(w2)
    name = flashcomm.group_name(None)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_compact_pair, backend=counter, fullgraph=True, dynamic=True)
    mismatches: list[int] = []
    totals: dict[str, int] = {}  # strategy counts of the compiled calls only
    flashcomm.reset_stats()
    for n in sequence:
        x = torch.randn(n, K // tp, generator=g)  # this rank's K-slice (compared to eager)
        mark_unbacked(x, 0)
        got = compiled(x, w1, w2, w1_q, w1_s, w2_q, w2_s, name, THRESHOLD)
        compiled_stats = flashcomm.stats()
        want = _compact_pair(x, w1, w2, w1_q, w1_s, w2_q, w2_s, name, THRESHOLD)
        flashcomm.reset_stats()
        for a, b in zip(got, want):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
                mismatches.append(n)
        for op, counts in compiled_stats.items():
            for strategy, count in counts.items():
                totals[f"{op}.{strategy}"] = totals.get(f"{op}.{strategy}", 0) + count
    return counter.frame_count, mismatches, totals


@pytest.mark.parametrize("backend,tp", [("inductor", 2), ("aot_eager", 1), ("aot_eager", 4)])
def test_one_compilation_across_token_counts(ranks, backend, tp):
    results = ranks(tp).run(_compile_on_rank, backend, TOKEN_SEQUENCE, timeout_s=600)
    expected_pipelined = sum(1 for n in TOKEN_SEQUENCE if n > THRESHOLD) if tp > 1 else 0
    for frames, mismatches, totals in results:
        assert frames == 1, f"expected exactly one compilation, got {frames}"
        assert mismatches == [], f"compiled != eager at n = {mismatches}"
        for op in ("gemm_rs", "ag_gemm", "gemm_rs_w8a8", "ag_gemm_w8a8"):
            assert totals[f"{op}.pipelined"] == expected_pipelined, totals
            assert totals[f"{op}.sequential"] == len(TOKEN_SEQUENCE) - expected_pipelined
