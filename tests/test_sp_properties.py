"""Property-based tests (hypothesis) of the layout-invariant ops: random n
(0..1200), sp_threshold (so both modes occur, including ranks that own no rows),
K / N, FP or W8A8, gather flags, with don't-care input rows NaN and poisoning on.
Each example checks every valid row against the dense reference, every
don't-care output row is NaN, and the mode counters. Examples per test:
FLASHCOMM_FUZZ_EXAMPLES (default 25; ``make fuzz``: 500)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flashcomm
from flashcomm.tools.reference import (gemm_rs_w8a8_reference, quantize_weight_per_channel,
                                       relative_error, w8a8_linear)

from _cases import RTOL, TPS
from test_properties import FUZZ
from test_sp_ops import (_check_mode, _check_norm_results, _check_rows, _column_on_rank,
                         _norm_on_rank, _norm_reference, _row_on_rank, _valid_for)


def _draw_shape(data, tp: int):
    n = data.draw(st.one_of(st.integers(0, 3 * tp), st.integers(0, 1200)), label="n")
    sp_threshold = data.draw(st.one_of(st.just(0), st.integers(0, 1200)), label="sp_threshold")
    k = tp * data.draw(st.integers(1, 24), label="K/tp")
    n_out = tp * data.draw(st.integers(1, 24), label="N/tp")
    return n, sp_threshold, k, n_out


def _weights(g, n_out, k, w8a8):
    w = torch.randn(n_out, k, generator=g) / k**0.5
    return quantize_weight_per_channel(w) if w8a8 else w


@pytest.mark.parametrize("tp", TPS)
@FUZZ
@given(data=st.data())
def test_sp_linear_property(ranks, tp, data):
    n, sp_threshold, k, n_out = _draw_shape(data, tp)
    w8a8 = data.draw(st.booleans(), label="w8a8")
    row = data.draw(st.booleans(), label="row-parallel")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    x = torch.randn(n, k, generator=g)
    w = _weights(g, n_out, k, w8a8)
    b = torch.randn(n_out, generator=g)
    mode = flashcomm.sp_mode(n, tp, sp_threshold)
    pool = ranks(tp)
    if row:
        results = pool.run(_row_on_rank, x, w, b, sp_threshold, w8a8)
        want = (gemm_rs_w8a8_reference(x, w[0], w[1], None, None, b, tp) if w8a8
                else x.double() @ w.double().t() + b.double())
        for rank, (out, counts) in enumerate(results):
            _check_mode(counts, mode)
            assert out.shape == (n, n_out)
            _check_rows(out, want, _valid_for(mode, n, tp, rank), torch.float32)
        return
    gather_output = data.draw(st.booleans(), label="gather_output")
    results = pool.run(_column_on_rank, x, w, b, sp_threshold, w8a8, gather_output)
    want = (w8a8_linear(x, w[0], w[1], bias=b) if w8a8
            else x.double() @ w.double().t() + b.double())
    outs = []
    for out, counts in results:
        _check_mode(counts, mode)
        outs.append(out)
    for full in (outs if gather_output else [torch.cat(outs, dim=1)]):
        assert full.shape == (n, n_out)
        assert relative_error(full, want) <= RTOL[torch.float32]


@pytest.mark.parametrize("tp", TPS)
@FUZZ
@given(data=st.data())
def test_sp_add_rms_norm_property(ranks, tp, data):
    n, sp_threshold, h, _ = _draw_shape(data, tp)
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    with_residual = data.draw(st.booleans(), label="residual")
    gather = data.draw(st.booleans(), label="gather")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    x = torch.randn(n, h, generator=g).to(dtype)
    residual = torch.randn(n, h, generator=g).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
    want_normed, want_residual = _norm_reference(x, residual, weight)
    mode = flashcomm.sp_mode(n, tp, sp_threshold)
    results = ranks(tp).run(_norm_on_rank, x, residual, weight, sp_threshold, gather)
    _check_norm_results(results, want_normed, want_residual, n, tp, mode, dtype, gather)
