"""gemm_rs (FP) on real gloo groups of 1, 2 and 4 ranks against a dense
single-process reference."""

from __future__ import annotations

import pytest
import torch

import flashcomm
from flashcomm.tools.reference import feature_slice, gemm_rs_reference, relative_error, shard_rows

from _cases import (DTYPES, RTOL, THRESHOLD, TPS, assert_ran, call_and_count,
                    expected_strategy, linear_inputs, rank_and_size, token_counts)

K, N = 64, 48


def _gemm_rs_on_rank(x_full, w_full, bias, threshold, enabled, bias_on_rank0_only=False):
    rank, tp = rank_and_size()
    x = feature_slice(x_full, tp, rank, dim=1)
    w = feature_slice(w_full, tp, rank, dim=1)
    b = None if (bias_on_rank0_only and rank > 0) else bias
    return call_and_count("gemm_rs", flashcomm.gemm_rs, x, w, b, None, threshold, enabled)


def _inputs(n, dtype, with_bias, seed=0):
    return linear_inputs(n, K, N, dtype, with_bias, seed)


def _check(results, x, w, b, tp, n, dtype):
    blocks = [out for out, _ in results]
    c = shard_rows(n, tp)
    for out in blocks:
        assert out.shape == ((n if tp == 1 else c), N) and out.dtype == dtype
    full = torch.cat(blocks)
    assert torch.all(full[n:] == 0), "padding rows must be zero"
    want = gemm_rs_reference(x, w, b, tp)
    assert relative_error(full[:n], want) <= RTOL[dtype]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", TPS)
def test_gemm_rs_matches_dense(ranks, tp, dtype, with_bias):
    pool = ranks(tp)
    for n in token_counts(tp):
        x, w, b = _inputs(n, dtype, with_bias)
        results = pool.run(_gemm_rs_on_rank, x, w, b, THRESHOLD, True)
        _check(results, x, w, b, tp, n, dtype)
        for _, counts in results:
            assert_ran(counts, expected_strategy(n, tp, THRESHOLD))


@pytest.mark.parametrize("tp", [2, 4])
def test_gemm_rs_bias_once_when_only_rank0_passes_it(ranks, tp):
    n = 1001
    x, w, b = _inputs(n, torch.float32, True)
    for threshold in (0, 5000):  # pipelined, sequential
        results = ranks(tp).run(_gemm_rs_on_rank, x, w, b, threshold, True, True)
        _check(results, x, w, b, tp, n, torch.float32)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("n", [5, 64, 2053])
def test_gemm_rs_strategies_agree(ranks, tp, n):
    """Forcing each strategy through threshold/enabled gives the same output."""
    x, w, b = _inputs(n, torch.float32, True)
    pool = ranks(tp)
    pipelined = pool.run(_gemm_rs_on_rank, x, w, b, 0, True)
    sequential = pool.run(_gemm_rs_on_rank, x, w, b, 0, False)
    for (p_out, p_counts), (s_out, s_counts) in zip(pipelined, sequential):
        assert_ran(p_counts, "pipelined")
        assert_ran(s_counts, "sequential")
        torch.testing.assert_close(p_out, s_out, rtol=1e-5, atol=1e-5)


def _gemm_rs_with_chunks(x_full, w_full, max_chunks, min_rows):
    saved = flashcomm.get_pipeline_config()
    flashcomm.set_pipeline_config(max_chunks, min_rows)
    try:
        return _gemm_rs_on_rank(x_full, w_full, None, 0, True)
    finally:
        flashcomm.set_pipeline_config(*saved)


@pytest.mark.parametrize("max_chunks,min_rows", [(1, 1), (3, 1), (8, 4), (16, 1)])
def test_gemm_rs_chunk_plans(ranks, max_chunks, min_rows):
    n = 203
    x, w, _ = _inputs(n, torch.float32, False)
    results = ranks(2).run(_gemm_rs_with_chunks, x, w, max_chunks, min_rows)
    _check(results, x, w, None, 2, n, torch.float32)


def _auto_threshold_on_rank(x_full, w_full, table_threshold):
    rank, tp = rank_and_size()
    x = feature_slice(x_full, tp, rank, dim=1)
    w = feature_slice(w_full, tp, rank, dim=1)
    torch.ops.flashcomm.clear_auto_thresholds()
    counts = []
    try:
        # auto without a table entry: 1000
        counts.append(call_and_count("gemm_rs", flashcomm.gemm_rs, x, w, None, None, -1)[1])
        if table_threshold is not None:
            torch.ops.flashcomm.set_auto_threshold("gemm_rs", x.shape[1], w.shape[0], tp,
                                                   "float32", table_threshold)
        counts.append(call_and_count("gemm_rs", flashcomm.gemm_rs, x, w, None, None, -1)[1])
    finally:
        torch.ops.flashcomm.clear_auto_thresholds()
    return counts


def test_gemm_rs_auto_threshold_uses_table(ranks):
    x, w, _ = _inputs(300, torch.float32, False)
    for counts in ranks(2).run(_auto_threshold_on_rank, x, w, 100):
        assert_ran(counts[0], "sequential")  # 300 <= 1000
        assert_ran(counts[1], "pipelined")   # 300 > 100 from the table
