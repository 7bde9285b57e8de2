"""torch.library.opcheck on every op and sample (schema, autograd registration,
fake tensor / Meta kernel, AOT dispatch with static and dynamic shapes), with
tp = 1 and inside a 2-rank group."""

from __future__ import annotations

import pytest
import torch

from flashcomm.tools.reference import quantize_dynamic, quantize_weight_per_channel

from _cases import rank_and_size

OPS = ["gemm_rs", "ag_gemm", "gemm_rs_w8a8", "ag_gemm_w8a8"]
K, N = 32, 24


def _samples(op: str, tp: int, group_name: str):
    """(args, kwargs) samples covering both strategies, bias, W8A8 modes, gather_output."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(N, K, generator=g)
    w_q, w_s = quantize_weight_per_channel(w)
    b = torch.randn(N, generator=g)
    for n in (0, 1, 5, 37):
        c = -(-n // tp)
        x_row = torch.randn(n, K, generator=g)
        x_shard = torch.randn(c, K, generator=g)
        for threshold in (0, 1000):  # pipelined (tp > 1), sequential
            if op == "gemm_rs":
                yield (x_row, w, b, group_name), {"threshold": threshold}
                yield (x_row.bfloat16(), w.bfloat16(), None, group_name), {"threshold": threshold}
            elif op == "ag_gemm":
                for gather in (False, True):
                    yield (x_shard, w, b, group_name, n), {"threshold": threshold,
                                                           "gather_output": gather}
            elif op == "gemm_rs_w8a8":
                s = torch.tensor([0.02])
                zp = torch.tensor([3], dtype=torch.int32)
                x_q, x_s = quantize_dynamic(x_row)
                for scale, zero, x, out in ((None, None, x_row, torch.bfloat16),
                                            (s, zp, x_row, torch.float32),
                                            (x_s, None, x_q, torch.float16)):
                    yield (x, w_q, w_s, scale, zero, b, group_name, out), {"threshold": threshold}
            else:
                s = torch.tensor([0.02])
                x_q, x_s = quantize_dynamic(x_shard)
                for scale, x, out in ((None, x_shard, torch.bfloat16), (s, x_shard, torch.float32),
                                      (x_s, x_q, torch.float32)):
                    yield (x, w_q, w_s, scale, None, b, group_name, n, out), {
                        "threshold": threshold, "gather_output": threshold == 0}


def _opcheck_on_rank(op: str):
    import flashcomm

    _, tp = rank_and_size()
    name = flashcomm.group_name(None)
    overload = getattr(torch.ops.flashcomm, op).default
    checked = 0
    for args, kwargs in _samples(op, tp, name):
        result = torch.library.opcheck(overload, args, kwargs)
        bad = {k: v for k, v in result.items() if v != "SUCCESS"}
        assert not bad, f"{op} opcheck failed for {bad}"
        checked += 1
    return checked


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(ranks, op, tp):
    counts = ranks(tp).run(_opcheck_on_rank, op, timeout_s=600)
    assert counts[0] > 0 and len(set(counts)) == 1
