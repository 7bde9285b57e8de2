"""ag_gemm (FP) on real gloo groups of 1, 2 and 4 ranks against a dense
single-process reference. Shard padding rows are NaN, proving they are dropped."""

from __future__ import annotations

import pytest
import torch

import flashcomm
from flashcomm.tools.reference import feature_slice, relative_error, token_shard

from _cases import (DTYPES, RTOL, THRESHOLD, TPS, assert_ran, call_and_count,
                    expected_strategy, linear_inputs, rank_and_size, token_counts)

K, N = 48, 64


def _ag_gemm_on_rank(x_full, w_full, bias_full, threshold, enabled, gather_output):
    rank, tp = rank_and_size()
    n = x_full.shape[0]
    x = token_shard(x_full, tp, rank, fill=float("nan"))
    w = feature_slice(w_full, tp, rank, dim=0)
    b = None if bias_full is None else feature_slice(bias_full, tp, rank, dim=0)
    return call_and_count("ag_gemm", flashcomm.ag_gemm, x, w, b, None, n, threshold, enabled,
                          gather_output)


def _inputs(n, dtype, with_bias, seed=1):
    return linear_inputs(n, K, N, dtype, with_bias, seed)


def _reference(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def _check(results, x, w, b, tp, dtype, gather_output):
    n = x.shape[0]
    want = _reference(x, w, b)
    outs = [out for out, _ in results]
    for out in outs:
        assert out.dtype == dtype
        assert out.shape == (n, N if gather_output else N // tp)
    got = outs if gather_output else [torch.cat(outs, dim=1)]
    for full in got:
        assert relative_error(full, want) <= RTOL[dtype]


@pytest.mark.parametrize("gather_output", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", TPS)
def test_ag_gemm_matches_dense(ranks, tp, dtype, with_bias, gather_output):
    pool = ranks(tp)
    for n in token_counts(tp):
        x, w, b = _inputs(n, dtype, with_bias)
        results = pool.run(_ag_gemm_on_rank, x, w, b, THRESHOLD, True, gather_output)
        _check(results, x, w, b, tp, dtype, gather_output)
        for _, counts in results:
            assert_ran(counts, expected_strategy(n, tp, THRESHOLD))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("n", [5, 64, 2053])
def test_ag_gemm_strategies_agree(ranks, tp, n):
    x, w, b = _inputs(n, torch.float32, True)
    pool = ranks(tp)
    pipelined = pool.run(_ag_gemm_on_rank, x, w, b, 0, True, False)
    sequential = pool.run(_ag_gemm_on_rank, x, w, b, 0, False, False)
    for (p_out, p_counts), (s_out, s_counts) in zip(pipelined, sequential):
        assert_ran(p_counts, "pipelined")
        assert_ran(s_counts, "sequential")
        torch.testing.assert_close(p_out, s_out, rtol=1e-5, atol=1e-5)


def _gemm_rs_then_ag_gemm(x_full, w1_full, w2_full, threshold):
    """The compact sequence-parallel pair: row-parallel out, column-parallel in."""
    rank, tp = rank_and_size()
    n = x_full.shape[0]
    x = feature_slice(x_full, tp, rank, dim=1)
    w1 = feature_slice(w1_full, tp, rank, dim=1)
    w2 = feature_slice(w2_full, tp, rank, dim=0)
    h = flashcomm.gemm_rs(x, w1, None, None, threshold)
    return flashcomm.ag_gemm(h, w2, None, None, n, threshold, gather_output=True)


@pytest.mark.parametrize("n", [3, 1001])
def test_gemm_rs_output_feeds_ag_gemm(ranks, n):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, K, generator=g)
    w1 = torch.randn(K, K, generator=g) / K**0.5
    w2 = torch.randn(N, K, generator=g) / K**0.5
    want = (x.double() @ w1.double().t()) @ w2.double().t()
    for out in ranks(4).run(_gemm_rs_then_ag_gemm, x, w1, w2, THRESHOLD):
        assert relative_error(out, want) <= 1e-5
