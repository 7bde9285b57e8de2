"""Debug settings that make one GPU (or one CPU process) test what a group of many
would: FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1 makes a one-rank group take every collective
path (pipelined chunks, sharded mode, the agreement check), and the agreement check
refuses to run inside a CUDA-graph capture (tested through a hook that makes it believe
the stream is capturing)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flashcomm
from flashcomm.tools.reference import quantize_weight_per_channel, relative_error, w8a8_linear

from conftest import TRANSPORTS

FORCED = {"FLASHCOMM_DEBUG_FORCE_COLLECTIVES": "1"}


def _forced_paths():
    g = torch.Generator().manual_seed(0)
    n, K, N = 2001, 64, 48
    x, w, b = (torch.randn(n, K, generator=g), torch.randn(N, K, generator=g),
               torch.randn(N, generator=g))
    w_q, w_s = quantize_weight_per_channel(w)
    flashcomm.reset_stats()
    outs = {
        "gemm_rs": flashcomm.gemm_rs(x, w, b, None, threshold=1000),
        "ag_gemm": flashcomm.ag_gemm(x, w, b, None, n, threshold=1000),
        "ag_gemm_w8a8": flashcomm.ag_gemm_w8a8(x, w_q, w_s, None, None, b, None, n,
                                               torch.float32, threshold=1000),
        "sp_row_linear": flashcomm.sp_row_linear(x, w, b, None, 1000),
        "sp_column_linear": flashcomm.sp_column_linear(x, w, b, None, 1000),
        "sp_reduce": flashcomm.sp_reduce(x, None, 1000),
    }
    return outs, flashcomm.stats(), flashcomm.transport(None)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forced_collectives_take_the_multi_rank_paths_at_tp1(rank_pools, transport):
    pool = rank_pools(1, env={**FORCED, "FLASHCOMM_TRANSPORT": transport})
    (outs, stats, chosen), = pool.run(_forced_paths)
    assert chosen == transport
    # The sharded sp_row_linear / sp_column_linear count their compact kernel too.
    for op, calls in (("gemm_rs", 2), ("ag_gemm", 2), ("ag_gemm_w8a8", 1)):
        assert stats[op] == {"sequential": 0, "pipelined": calls}, (op, stats[op])
    for op in ("sp_row_linear", "sp_column_linear", "sp_reduce"):
        assert stats[op] == {"replicated": 0, "sharded": 1}, (op, stats[op])
    g = torch.Generator().manual_seed(0)
    n, K, N = 2001, 64, 48
    x, w, b = (torch.randn(n, K, generator=g), torch.randn(N, K, generator=g),
               torch.randn(N, generator=g))
    dense = x.double() @ w.double().t() + b.double()
    for op in ("gemm_rs", "ag_gemm", "sp_row_linear", "sp_column_linear"):
        assert outs[op].shape == (n, N) and relative_error(outs[op], dense) < 1e-5, op
    w_q, w_s = quantize_weight_per_channel(w)
    assert relative_error(outs["ag_gemm_w8a8"], w8a8_linear(x, w_q, w_s, bias=b)) < 1e-5
    assert torch.equal(outs["sp_reduce"], x)


def _first_use_while_capturing():
    group = dist.new_group([0], backend="gloo")
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    torch.ops.flashcomm_testing.set_capturing(True)
    try:
        refused = ""
        try:
            flashcomm.gemm_rs(x, w, None, group)
        except RuntimeError as e:
            refused = str(e)
        torch.ops.flashcomm_testing.set_capturing(False)
        flashcomm.init(group)  # before capture: agreement and transport done
        torch.ops.flashcomm_testing.set_capturing(True)
        out = flashcomm.gemm_rs(x, w, None, group)  # no host synchronisation any more
        return refused, tuple(out.shape)
    finally:
        torch.ops.flashcomm_testing.set_capturing(False)


def test_agreement_refuses_to_run_inside_a_capture(rank_pools):
    (refused, shape), = rank_pools(1, env=FORCED).run(_first_use_while_capturing)
    assert "gemm_rs: the ranks of group" in refused, refused
    assert "capturing a CUDA graph" in refused and "flashcomm.init" in refused, refused
    assert shape == (4, 6)
