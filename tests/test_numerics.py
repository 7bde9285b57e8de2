"""Numerical edge cases of the compact ops, each with a defined behaviour that the
test's docstring states and the test checks exactly: all-zero rows under dynamic
W8A8, scale underflow, NaN / Inf in the input (FP and W8A8), int8 saturation under
a static scale, the int32 accumulation bound, and fp16 / bf16 outputs that
overflow. Every case runs on 1 and 2 ranks and, where a collective runs, with both
strategies (threshold 0 = pipelined, 10**9 = sequential).

Conventions of the checks: gemm_rs outputs are concatenated over ranks, the padding
rows must be exactly zero and are then dropped; ag_gemm runs with
gather_output=True, every rank must return the same tensor (NaN positions
included) and rank 0's is checked.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashcomm
from flashcomm.tools.reference import (feature_slice, int8_gemm, quantize_dynamic, shard_rows,
                                       token_shard, w8a8_linear)
from flashcomm.tools.testing import RankError

from _cases import RTOL, rank_and_size

TPS = [1, 2]
STRATEGIES = {"pipelined": 0, "sequential": 10**9}
NAN, INF = float("nan"), float("inf")
MAX_K = 131071  # largest K of an int8 x int8 dot product that cannot overflow int32


# --- worker side ---------------------------------------------------------------

def _row_fp(x_full, w_full, bias, threshold):
    rank, tp = rank_and_size()
    return flashcomm.gemm_rs(feature_slice(x_full, tp, rank, 1),
                             feature_slice(w_full, tp, rank, 1), bias, None, threshold)


def _col_fp(x_full, w_full, bias, threshold):
    rank, tp = rank_and_size()
    b = None if bias is None else feature_slice(bias, tp, rank, 0)
    return flashcomm.ag_gemm(token_shard(x_full, tp, rank, fill=NAN),
                             feature_slice(w_full, tp, rank, 0), b, None, x_full.shape[0],
                             threshold, True, True)


def _row_w8a8(x_full, w_full, w_scale, scale, zp, bias, out_dtype, threshold):
    rank, tp = rank_and_size()
    return flashcomm.gemm_rs_w8a8(feature_slice(x_full, tp, rank, 1),
                                  feature_slice(w_full, tp, rank, 1), w_scale, scale, zp, bias,
                                  None, out_dtype, threshold)


def _col_w8a8(x_full, w_full, w_scale, scale, zp, bias, out_dtype, threshold):
    rank, tp = rank_and_size()
    int8 = x_full.dtype == torch.int8
    x = token_shard(x_full, tp, rank, fill=0 if int8 else NAN)
    if scale is not None and scale.dim() == 2:
        scale = token_shard(scale, tp, rank, fill=NAN)
    ws = w_scale if w_scale.numel() == 1 else feature_slice(w_scale, tp, rank, 0)
    b = None if bias is None else feature_slice(bias, tp, rank, 0)
    return flashcomm.ag_gemm_w8a8(x, feature_slice(w_full, tp, rank, 0), ws, scale, zp, b, None,
                                  x_full.shape[0], out_dtype, threshold, True, True)


# --- parent side ---------------------------------------------------------------

ROW = {"fp": _row_fp, "w8a8": _row_w8a8}
COL = {"fp": _col_fp, "w8a8": _col_w8a8}


def _run(pool, op: str, *args) -> torch.Tensor:
    """Runs op (gemm_rs / ag_gemm / gemm_rs_w8a8 / ag_gemm_w8a8) on every rank from
    full inputs; returns the global [n, N] result after the layout checks."""
    kind = "w8a8" if op.endswith("w8a8") else "fp"
    n = args[0].shape[0]
    if op.startswith("gemm_rs"):
        blocks = pool.run(ROW[kind], *args)
        if pool.world_size > 1:
            assert all(b.shape[0] == shard_rows(n, pool.world_size) for b in blocks)
        full = torch.cat(blocks)
        assert torch.all(full[n:] == 0), "padding rows must stay exactly zero"
        return full[:n]
    outs = pool.run(COL[kind], *args)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0, equal_nan=True)
    return outs[0]


def _assert_rows_close(got, want, rows, dtype):
    """Rows `rows` of got match the float64 reference within RTOL[dtype]."""
    g, w = got[rows].double(), want[rows].double()
    assert torch.isfinite(g).all(), "non-finite value in a row without non-finite input"
    err = (g - w).abs().max().item() if g.numel() else 0.0
    assert err <= RTOL[dtype] * max(w.abs().max().item(), 1e-12), err


def _w8a8_inputs(n, k, n_out, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    w = torch.randint(-128, 128, (n_out, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n_out, generator=g) * 0.02 + 1e-3
    return x, w, ws, torch.randn(n_out, generator=g)


def _w8a8_reference_rows(x, w, ws, bias, tp, op):
    """Dense dynamic-W8A8 reference (per-rank K-slices for gemm_rs_w8a8)."""
    if op == "ag_gemm_w8a8":
        return w8a8_linear(x, w, ws, None, None, bias).double()
    total = sum(w8a8_linear(feature_slice(x, tp, r, 1), feature_slice(w, tp, r, 1), ws)
                .double() for r in range(tp))
    return total if bias is None else total + bias.double()


# --- W8A8 dynamic: zero rows, underflow, NaN / Inf ------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("op", ["gemm_rs_w8a8", "ag_gemm_w8a8"])
@pytest.mark.parametrize("tp", TPS)
def test_w8a8_dynamic_all_zero_rows(ranks, tp, op, strategy, with_bias):
    """Defined: under dynamic per-token quantisation an all-zero row gets scale 0,
    int8 values 0 and an output row equal to exactly ``bias`` cast to out_dtype
    (exactly 0 without bias) -- never NaN (no 0/0). For gemm_rs_w8a8 the rule holds
    per rank: a row that is zero in one rank's K-slice only contributes 0 from that
    rank. A fully zero x gives bias (or 0) everywhere. Other rows match the dense
    reference."""
    n, k, n_out = 37, 16 * tp, 24
    x, w, ws, b = _w8a8_inputs(n, k, n_out, seed=11)
    bias = b if with_bias else None
    zero_rows, other = [0, 5, 18, 36], [i for i in range(n) if i not in (0, 5, 18, 36)]
    x[zero_rows] = 0
    x[10, : k // tp] = 0  # zero in rank 0's K-slice only (gemm_rs_w8a8, tp > 1)
    expect_zero_row = (torch.zeros(n_out) if bias is None else bias).to(torch.float32)
    pool = ranks(tp)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = _run(pool, op, x, w, ws, None, None, bias, out_dtype, STRATEGIES[strategy])
        assert got.dtype == out_dtype and not got.isnan().any()
        for i in zero_rows:
            assert torch.equal(got[i], expect_zero_row.to(out_dtype)), i
        want = _w8a8_reference_rows(x, w, ws, bias, tp, op)
        _assert_rows_close(got, want, other, out_dtype)

    zeros = torch.zeros(n, k)
    got = _run(pool, op, zeros, w, ws, None, None, bias, torch.float32, STRATEGIES[strategy])
    assert torch.equal(got, expect_zero_row.expand(n, n_out))


@pytest.mark.parametrize("op", ["gemm_rs_w8a8", "ag_gemm_w8a8"])
@pytest.mark.parametrize("tp", TPS)
def test_w8a8_dynamic_scale_underflow(ranks, tp, op):
    """Defined: the dynamic scale is ``max|x_t| / 127`` in fp32. A non-zero row
    whose scale underflows to 0 (max|x_t| = 1e-44, subnormal) is treated exactly
    like an all-zero row: output = bias, no NaN, no Inf. A row of subnormal scale
    that does not underflow (max|x_t| = 1e-39) quantises normally and gives a
    finite output."""
    n, k, n_out = 9, 8 * tp, 8
    x, w, ws, bias = _w8a8_inputs(n, k, n_out, seed=12)
    x[2] = x[2].sign() * 1e-44
    x[4] = x[4] / x[4].abs().max() * 1e-39
    got = _run(ranks(tp), op, x, w, ws, None, None, bias, torch.float32, 0)
    assert torch.isfinite(got).all()
    assert torch.equal(got[2], bias)
    _assert_rows_close(got, _w8a8_reference_rows(x, w, ws, bias, tp, op),
                       [i for i in range(n) if i != 2], torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("op", ["gemm_rs_w8a8", "ag_gemm_w8a8"])
@pytest.mark.parametrize("tp", TPS)
def test_w8a8_dynamic_nan_inf_rows(ranks, tp, op, strategy):
    """Defined: under dynamic quantisation a row containing NaN gets a NaN scale
    (its int8 values become 0), so its output row is NaN in every column, bias or
    not. A row containing +/-Inf gets scale +Inf, every int8 value 0 (finite/Inf =
    0, Inf/Inf = NaN -> 0), and output 0 * Inf = NaN in every column. For
    gemm_rs_w8a8 one rank's non-finite K-slice makes the summed row NaN. The op
    neither raises nor hangs; every other row matches the dense reference (the
    ag_gemm_w8a8 NaN scale travels in the gathered message without disturbing its
    neighbours)."""
    n, k, n_out = 21, 8 * tp, 16
    x, w, ws, bias = _w8a8_inputs(n, k, n_out, seed=13)
    bad = {3: (k - 1, NAN), 7: (0, INF), 15: (k // 2, -INF)}  # k-1: last rank's slice
    for row, (col, value) in bad.items():
        x[row, col] = value
    got = _run(ranks(tp), op, x, w, ws, None, None, bias, torch.float32, STRATEGIES[strategy])
    for row in bad:
        assert got[row].isnan().all(), (row, got[row])
    clean = x.clone()
    clean[list(bad)] = 0
    others = [i for i in range(n) if i not in bad]
    _assert_rows_close(got, _w8a8_reference_rows(clean, w, ws, bias, tp, op), others,
                       torch.float32)


# --- W8A8 static: saturation, NaN, Inf -----------------------------------------

def _static_row_values() -> list[float]:
    """x values (scale 0.5) covering rounding ties, saturation and non-finite input."""
    return [0.0, 1.0, -1.0, 63.5, 63.75, -64.0, -64.25, 100.0, -100.0, 1e30, -1e30,
            NAN, INF, -INF, 0.25, 0.75]


def _expected_q(v: float, s: float, zp: int) -> int:
    """The C++ rule: q = clamp(round_half_even(v / s) + zp, -128, 127) with NaN -> 0
    (whatever the zero point), +Inf -> 127, -Inf -> -128."""
    if math.isnan(v):
        return 0
    if math.isinf(v):
        return 127 if v > 0 else -128
    return max(-128, min(127, round(v / s) + zp))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("zp", [0, 10, -7])
@pytest.mark.parametrize("op", ["gemm_rs_w8a8", "ag_gemm_w8a8"])
@pytest.mark.parametrize("tp", TPS)
def test_w8a8_static_saturation_nan_inf(ranks, tp, op, zp, strategy):
    """Defined: static quantisation is q = clamp(round_half_even(x / s) + zp,
    -128, 127): values beyond the int8 range saturate to 127 / -128 (no wrap-around),
    +/-Inf saturate the same way, and NaN maps to the int8 value 0 -- regardless of
    the zero point, so with zp != 0 a NaN input reads as the real value -zp * s,
    not 0. The output is then (q - zp) * s * w_scale. An identity weight exposes q
    exactly (s = 0.5 and w_scale = 1 keep the arithmetic exact in fp32)."""
    vals = _static_row_values()
    k = len(vals)  # 16: divisible by tp
    n = 5
    x = torch.tensor([vals[i:] + vals[:i] for i in range(n)])  # rows are rotations
    eye = torch.eye(k, dtype=torch.int8)
    s = 0.5
    scale = torch.tensor([s])
    zero_point = torch.tensor([zp], dtype=torch.int32) if zp else None
    got = _run(ranks(tp), op, x, eye, torch.ones(1), scale, zero_point, None, torch.float32,
               STRATEGIES[strategy])
    want = torch.tensor([[(_expected_q(v, s, zp) - zp) * s for v in row] for row in x.tolist()])
    assert torch.equal(got, want), (got - want).abs().max()


# --- int32 accumulation bound ----------------------------------------------------

def _bound_inputs(k_total: int):
    x = torch.full((3, k_total), -128, dtype=torch.int8)
    w = torch.stack([torch.full((k_total,), -128, dtype=torch.int8),
                     torch.full((k_total,), 127, dtype=torch.int8)])
    return x, w


@pytest.mark.parametrize("op", ["gemm_rs_w8a8", "ag_gemm_w8a8"])
@pytest.mark.parametrize("tp", TPS)
def test_int32_accumulation_bound(ranks, tp, op):
    """Defined: the bound is on the K of the local int8 GEMM (K_r per rank for
    gemm_rs_w8a8, the full K for ag_gemm_w8a8). K = 131071 is accepted and exact at
    the extremes: all -128 x times all -128 weights (unit scales) gives
    128 * 128 * 131071 = 2147467264 per rank, representable in fp32, so it must come
    back exactly (x tp for the summed gemm_rs_w8a8: 4294934528, also exact in fp32);
    -128 x 127 gives -2130690176, within float32 rounding. K = 131072 is rejected
    on every rank with a RuntimeError saying "exceeds 131071" -- no hang -- and the
    group keeps working afterwards."""
    pool = ranks(tp)
    one = torch.ones(1)
    k_total = MAX_K * (tp if op == "gemm_rs_w8a8" else 1)
    x, w = _bound_inputs(k_total)
    got = _run(pool, op, x, w, one, one, None, None, torch.float32, 0)
    reduced = tp if op == "gemm_rs_w8a8" else 1
    assert torch.equal(got[:, 0].double(), torch.full((3,), 128.0 * 128 * MAX_K * reduced,
                                                      dtype=torch.float64))
    want_mixed = -128.0 * 127 * MAX_K * reduced
    assert torch.allclose(got[:, 1].double(), torch.full((3,), want_mixed, dtype=torch.float64),
                          rtol=1e-7, atol=0)

    k_too_big = (MAX_K + 1) * (tp if op == "gemm_rs_w8a8" else 1)
    x, w = _bound_inputs(k_too_big)
    with pytest.raises(RankError, match="exceeds 131071"):
        _run(pool, op, x, w, one, one, None, None, torch.float32, 0)
    x, w = _bound_inputs(8 * tp)  # the group is healthy after the rejection
    assert torch.equal(_run(pool, op, x, w, one, one, None, None, torch.float32, 0)[:, 0],
                       torch.full((3,), 128.0 * 128 * 8 * tp))


@pytest.mark.parametrize("op", ["gemm_rs_w8a8", "ag_gemm_w8a8"])
def test_w8a8_k_equals_1(ranks, op):
    """Defined (README): int8 x int8 accumulation is exact for every K <= 131071,
    K = 1 included (regression: CPU at::_int_mm returns garbage for K == 1, so
    int8_matmul takes its exact float64 path there). With unit scales the output
    must equal the integer GEMM."""
    g = torch.Generator().manual_seed(14)
    x = torch.randint(-128, 128, (5, 1), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (4, 1), generator=g, dtype=torch.int8)
    one = torch.ones(1)
    got = _run(ranks(1), op, x, w, one, one, None, None, torch.float32, 0)
    assert torch.equal(got.to(torch.int64), int8_gemm(x, w))


@pytest.mark.parametrize("mode", ["dynamic", "int8_per_token"])
@pytest.mark.parametrize("tp,n,strategy", [(1, 1, "sequential"), (2, 1, "sequential"),
                                           (2, 3, "pipelined")])
def test_ag_gemm_w8a8_per_token_odd_k(ranks, tp, n, strategy, mode):
    """Defined (README): ag_gemm_w8a8 accepts any K <= 131071 with per-token scales
    (dynamic, or int8 x with [c, 1] scales) and matches the dense reference. K = 5
    with a GEMM piece of one row (n = 1; or tp = 2, n = 3 pipelined, whose second
    rank block has one valid row) is the regression case: the packed scale bytes of
    a one-row piece sit at byte offset K, so they must be copied before the float
    view."""
    k, n_out = 5, 4 * tp
    x, w, ws, bias = _w8a8_inputs(n, k, n_out, seed=16)
    scale = None
    if mode == "int8_per_token":
        x, scale = quantize_dynamic(x)
    got = _run(ranks(tp), "ag_gemm_w8a8", x, w, ws, scale, None, bias, torch.float32,
               STRATEGIES[strategy])
    want = w8a8_linear(x, w, ws, scale, None, bias)
    _assert_rows_close(got, want, list(range(n)), torch.float32)


# --- fp16 / bf16 overflow ----------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("op", ["gemm_rs_w8a8", "ag_gemm_w8a8"])
@pytest.mark.parametrize("tp", TPS)
def test_w8a8_output_overflow(ranks, tp, op, strategy):
    """Defined: W8A8 dequantises in fp32 and rounds once to out_dtype with IEEE
    round-to-nearest-even, so a value beyond the out dtype's range becomes +/-Inf
    (never clamped, never NaN): fp16 65504 stays 65504, 65519 rounds to 65504, 65520
    and above become inf, -80000 becomes -inf. gemm_rs_w8a8 reduces in out_dtype, so
    two finite fp16 partials (40000 each) whose sum exceeds 65504 give inf, and
    32752 + 32752 = 65504 stays finite. bf16: 2**127 stays finite, a value that
    overflows fp32 (2**137) is inf in bf16 and fp32 alike."""
    reduced = tp if op == "gemm_rs_w8a8" else 1
    k_r = 2
    k_total = k_r * reduced
    x = torch.full((3, k_total), 64, dtype=torch.int8)  # per-rank accumulator 64 * 2 * w
    n_out = 4
    w = torch.ones(n_out, k_total, dtype=torch.int8)
    w[2] = -1
    one = torch.ones(1)
    pool = ranks(tp)

    totals = [65504.0, 80000.0, -80000.0, 65520.0 if reduced == 1 else 65504.0]
    ws = torch.tensor([t / reduced / (64 * k_r) for t in totals]).abs()
    got = _run(pool, op, x, w, ws, one, None, None, torch.float16, STRATEGIES[strategy])
    assert got.dtype == torch.float16 and not got.isnan().any()
    want = torch.tensor([65504.0, INF, -INF, INF if reduced == 1 else 65504.0],
                        dtype=torch.float16)
    assert torch.equal(got, want.expand(3, n_out)), got
    if reduced == 1:
        ws1 = torch.tensor([65519.0 / 128, 1, 1, 1])
        got = _run(pool, op, x, w, ws1, one, None, None, torch.float16, STRATEGIES[strategy])
        assert torch.equal(got[:, 0], torch.full((3,), 65504.0, dtype=torch.float16))

    # bf16 / fp32: 128 * 2**100 * w_scale per rank.
    s_x = torch.tensor([2.0**100])
    ws = torch.tensor([2.0**20 / reduced, 2.0**30, 2.0**30, 1.0])
    for out_dtype in (torch.bfloat16, torch.float32):
        got = _run(pool, op, x, w, ws, s_x, None, None, out_dtype, STRATEGIES[strategy])
        assert not got.isnan().any()
        assert torch.equal(got[:, 0].float(), torch.full((3,), 2.0**127)), got[:, 0]
        assert torch.isposinf(got[:, 1]).all() and torch.isneginf(got[:, 2]).all()
        assert torch.equal(got[:, 3].float(), torch.full((3,), 128.0 * 2**100 * reduced))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["gemm_rs", "ag_gemm"])
@pytest.mark.parametrize("tp", TPS)
def test_fp_output_overflow(ranks, tp, op, dtype, strategy):
    """Defined: the FP ops compute and return in the input dtype; a result beyond
    its finite range is +/-Inf (IEEE), never clamped and never NaN unless infinities
    of opposite sign meet. fp16: totals 65504 (finite), 80000 (inf), -80000 (-inf);
    for gemm_rs on 2 ranks the 80000 is the sum of two finite 40000 partials, so the
    overflow happens in the reduce-scatter, which sums in the dtype. bf16: 2**127
    is finite, 2**129 is inf."""
    reduced = tp if op == "gemm_rs" else 1
    k_total = 2 * reduced
    if dtype == torch.float16:
        x_val, totals, want = 64.0, [65504.0, 80000.0, -80000.0, 1.0], [65504.0, INF, -INF, 1.0]
    else:
        x_val, totals, want = 2.0**64, [2.0**127, 2.0**129, -2.0**129, 1.0], \
            [2.0**127, INF, -INF, 1.0]
    x = torch.full((3, k_total), x_val, dtype=dtype)
    w = torch.tensor([[t / (k_total * x_val)] * k_total for t in totals], dtype=dtype)
    got = _run(ranks(tp), op, x, w, None, STRATEGIES[strategy])
    assert got.dtype == dtype and not got.isnan().any(), got
    assert torch.equal(got, torch.tensor(want, dtype=dtype).expand(3, 4)), got


# --- FP: NaN / Inf propagation ------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["gemm_rs", "ag_gemm"])
@pytest.mark.parametrize("tp", TPS)
def test_fp_nan_inf_propagate(ranks, tp, op, dtype, strategy):
    """Defined: the FP ops follow IEEE arithmetic row by row and never raise on
    non-finite values. A NaN in x row i makes output row i NaN in every column; a
    +/-Inf at x[i, k] makes output[i, j] = +/-Inf * sign(W[j, k]) (weights non-zero,
    one Inf per row). Non-finite values never leak into other rows, and gemm_rs
    padding rows stay exactly 0. A NaN weight W[j, k] makes output column j NaN in
    every (valid) row."""
    n, n_out = 23, 8
    k = 8 * tp if op == "gemm_rs" else 8
    g = torch.Generator().manual_seed(15)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = torch.randn(n_out, k, generator=g).to(dtype)
    bias = torch.randn(n_out, generator=g).to(dtype)
    bad = {3: (k - 1, NAN), 7: (2, INF), 20: (5, -INF)}  # k-1: last rank's K-slice
    for row, (col, value) in bad.items():
        x[row, col] = value
    pool = ranks(tp)
    got = _run(pool, op, x, w, bias, STRATEGIES[strategy])
    assert got[3].isnan().all()
    for row, (col, value) in list(bad.items())[1:]:
        assert torch.equal(got[row], (value * w[:, col].double().sign()).to(dtype)), row
    clean = x.clone()
    clean[list(bad)] = 0
    want = clean.double() @ w.double().t() + bias.double()
    _assert_rows_close(got, want, [i for i in range(n) if i not in bad], dtype)

    w_nan = w.clone()
    w_nan[4, 0] = NAN
    got = _run(pool, op, clean, w_nan, bias, STRATEGIES[strategy])
    assert got[:, 4].isnan().all()
    assert not got[:, [j for j in range(n_out) if j != 4]].isnan().any()
