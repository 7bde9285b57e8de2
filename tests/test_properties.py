"""Property-based tests (hypothesis) of every compact op against the dense
reference in flashcomm.tools.reference, on real gloo groups of 1, 2 and 4 ranks.

Each example draws the token count n (0..1500, with extra weight on small n and
on the default threshold), the shapes (K and N multiples of tp where the layout
needs it), the threshold / enabled flag (so both strategies run), the pipeline
chunking, the dtypes, bias on/off (gemm_rs: on every rank or on rank 0 only),
gather_output, and for W8A8 the quantisation mode: dynamic per-token, static
symmetric, static asymmetric with a zero point (scales small enough that int8
saturates), int8 x with a per-tensor or a per-token scale, per-channel
([N] / [N, 1]) or per-tensor weight scales, and optionally all-zero rows (dynamic
scale 0). Every example checks the output
layout, the padding, the value against the reference and the strategy counters.

Examples per test: ``FLASHCOMM_FUZZ_EXAMPLES`` (default 25; ``make fuzz`` runs
500). Derandomized (a fixed sequence, reproducible in CI) unless
``FLASHCOMM_FUZZ_DERANDOMIZE=0``, which ``make fuzz`` sets.

Error bound: ``max|got - want| <= rtol * max(M)`` where M is the elementwise
magnitude of the terms that were rounded (``|x| @ |W|^T + |bias|`` for the FP
ops, the sum of the ranks' ``|partial|`` for W8A8), so the check stays tight
under cancellation, where ``max|want|`` alone would not.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import flashcomm
from flashcomm.tools.reference import (feature_slice, quantize_dynamic, shard_rows, token_shard,
                                       w8a8_linear)

from _cases import RTOL, TPS, assert_ran, call_and_count, expected_strategy, rank_and_size

EXAMPLES = int(os.environ.get("FLASHCOMM_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = os.environ.get("FLASHCOMM_FUZZ_DERANDOMIZE", "1") != "0"
AUTO_DEFAULT = 1000  # what threshold < 0 resolves to with no tuning-table entry

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    database=None if DERANDOMIZE else settings.default.database,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
    print_blob=True,
)

FP_DTYPES = [torch.float32, torch.bfloat16]
W8A8_MODES = ["dynamic", "static", "static_asym", "int8_static", "int8_per_token"]
W8A8_OUT = [torch.float32, torch.bfloat16]
# Smallest per-rank K drawn for W8A8 (K = 1 once hit a CPU _int_mm bug; see
# test_w8a8_k_equals_1 in test_numerics.py).
W8A8_MIN_K = 1
# K granularity for ag_gemm_w8a8 with per-token scales (any K: see
# test_ag_gemm_w8a8_per_token_odd_k in test_numerics.py).
AG_PER_TOKEN_K_MULTIPLE = 1
PER_TOKEN_MODES = ("dynamic", "int8_per_token")


# --- drawing -------------------------------------------------------------------

def _draw_common(data, tp: int) -> dict:
    """n, threshold, enabled, pipeline chunking and a seed for the tensors."""
    n = data.draw(st.one_of(st.integers(0, 2 * tp + 3), st.integers(0, 1500),
                            st.sampled_from([999, 1000, 1001])), label="n")
    threshold = data.draw(st.one_of(st.sampled_from([-1, 0, 1000]), st.integers(0, 1600),
                                    st.sampled_from([n, max(n - 1, 0)])), label="threshold")
    enabled = data.draw(st.sampled_from([True, True, True, False]), label="enabled")
    chunks = data.draw(st.one_of(st.none(), st.tuples(st.integers(1, 8), st.integers(1, 64))),
                       label="pipeline_config")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    return dict(n=n, threshold=threshold, enabled=enabled, chunks=chunks, seed=seed)


def _strategy(case: dict, tp: int) -> str:
    t = AUTO_DEFAULT if case["threshold"] < 0 else case["threshold"]
    strategy = expected_strategy(case["n"], tp, t, case["enabled"])
    event(f"strategy={strategy}")  # shown by pytest --hypothesis-show-statistics
    return strategy


def _draw_mode(data) -> str:
    mode = data.draw(st.sampled_from(W8A8_MODES), label="mode")
    event(f"mode={mode}")
    return mode


def _draw_w8a8(data, g: torch.Generator, mode: str, n: int, k: int, n_out: int) -> dict:
    """x (float or int8) [n, k], int8 weight [n_out, k] with its scale, quantisation
    parameters of `mode`."""
    x_dtype = data.draw(st.sampled_from(FP_DTYPES), label="x_dtype")
    amp = data.draw(st.sampled_from([1e-3, 1.0, 50.0]), label="amplitude")
    ws_kind = data.draw(st.sampled_from(["[N]", "[N,1]", "[1]"]), label="weight_scale")
    zero_rows = data.draw(st.booleans(), label="zero_rows")  # dynamic scale 0
    x = (torch.randn(n, k, generator=g) * amp).to(x_dtype)
    w_q = torch.randint(-128, 128, (n_out, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n_out if ws_kind != "[1]" else 1, generator=g) * 0.02 + 1e-3
    if ws_kind == "[N,1]":
        w_scale = w_scale.reshape(-1, 1)
    scale = zp = None
    if mode in ("static", "static_asym"):
        # max|x| is about 4 amp: 0.5 / 127 saturates most values, 8 / 127 almost none.
        scale = torch.tensor([amp * data.draw(st.sampled_from([0.5, 2.0, 8.0]),
                                               label="static_range") / 127.0])
    if mode == "static_asym":
        zp = torch.tensor([data.draw(st.integers(-128, 127), label="zero_point")],
                          dtype=torch.int32)
    if mode == "int8_static":
        x = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.tensor([0.01])
    if zero_rows:
        x[::5] = 0
    if mode == "int8_per_token":
        x, scale = quantize_dynamic(x)  # zero rows: scale 0
    return dict(mode=mode, x=x, w_q=w_q, w_scale=w_scale, scale=scale, zp=zp)


# --- worker side ---------------------------------------------------------------

@contextlib.contextmanager
def _config(threshold: int, chunks):
    """Pipeline chunking for one call (same on every rank); auto threshold without
    a tuning-table entry."""
    saved = flashcomm.get_pipeline_config()
    if threshold < 0:
        torch.ops.flashcomm.clear_auto_thresholds()
    if chunks is not None:
        flashcomm.set_pipeline_config(*chunks)
    try:
        yield
    finally:
        flashcomm.set_pipeline_config(*saved)


def _gemm_rs_on_rank(x_full, w_full, bias, rank0_bias_only, threshold, enabled, chunks):
    rank, tp = rank_and_size()
    x = feature_slice(x_full, tp, rank, dim=1)
    w = feature_slice(w_full, tp, rank, dim=1)
    b = None if (bias is None or (rank0_bias_only and rank > 0)) else bias
    with _config(threshold, chunks):
        return call_and_count("gemm_rs", flashcomm.gemm_rs, x, w, b, None, threshold, enabled)


def _ag_gemm_on_rank(x_full, w_full, bias, threshold, enabled, gather_output, chunks):
    rank, tp = rank_and_size()
    x = token_shard(x_full, tp, rank, fill=float("nan"))  # padding must never be read
    w = feature_slice(w_full, tp, rank, dim=0)
    b = None if bias is None else feature_slice(bias, tp, rank, dim=0)
    with _config(threshold, chunks):
        return call_and_count("ag_gemm", flashcomm.ag_gemm, x, w, b, None, x_full.shape[0],
                              threshold, enabled, gather_output)


def _gemm_rs_w8a8_on_rank(x_full, w_q, w_scale, scale, zp, bias, out_dtype, threshold, enabled,
                          chunks):
    rank, tp = rank_and_size()
    x = feature_slice(x_full, tp, rank, dim=1)
    w = feature_slice(w_q, tp, rank, dim=1)
    with _config(threshold, chunks):
        return call_and_count("gemm_rs_w8a8", flashcomm.gemm_rs_w8a8, x, w, w_scale, scale, zp,
                              bias, None, out_dtype, threshold, enabled)


def _ag_gemm_w8a8_on_rank(x_full, w_q, w_scale, scale, zp, bias, out_dtype, threshold, enabled,
                          gather_output, chunks):
    rank, tp = rank_and_size()
    int8 = x_full.dtype == torch.int8
    x = token_shard(x_full, tp, rank, fill=0 if int8 else float("nan"))
    if scale is not None and scale.dim() == 2:  # per-token scales travel with their rows
        scale = token_shard(scale, tp, rank, fill=float("nan"))
    w = feature_slice(w_q, tp, rank, dim=0)
    s = w_scale if w_scale.numel() == 1 else feature_slice(w_scale, tp, rank, dim=0)
    b = None if bias is None else feature_slice(bias, tp, rank, dim=0)
    with _config(threshold, chunks):
        return call_and_count("ag_gemm_w8a8", flashcomm.ag_gemm_w8a8, x, w, s, scale, zp, b, None,
                              x_full.shape[0], out_dtype, threshold, enabled, gather_output)


# --- checks --------------------------------------------------------------------

def _assert_close(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, rtol: float,
                  what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite output on finite input"
    err = (got.double() - want.double()).abs().max().item()
    allowed = rtol * max(magnitude.double().max().item(), 1e-30)
    assert err <= allowed, f"{what}: max|got - want| = {err:.3e} > {allowed:.3e}"


def _check_counts(results, strategy: str, what: str) -> None:
    for rank, (_, counts) in enumerate(results):
        try:
            assert_ran(counts, strategy)
        except AssertionError as e:
            raise AssertionError(f"{what}, rank {rank}: {e}") from None


def _check_row_parallel(results, want, magnitude, n, n_out, tp, dtype, what):
    blocks = [out for out, _ in results]
    rows = n if tp == 1 else shard_rows(n, tp)
    for out in blocks:
        assert out.shape == (rows, n_out) and out.dtype == dtype, (what, out.shape, out.dtype)
    full = torch.cat(blocks)
    assert torch.all(full[n:] == 0), f"{what}: padding rows must be zero"
    _assert_close(full[:n], want, magnitude, RTOL[dtype], what)


def _check_column_parallel(results, want, magnitude, n, n_out, tp, dtype, gather_output, what):
    outs = [out for out, _ in results]
    for out in outs:
        assert out.dtype == dtype
        assert out.shape == (n, n_out if gather_output else n_out // tp), (what, out.shape)
    got = outs if gather_output else [torch.cat(outs, dim=1)]
    for full in got:
        _assert_close(full, want, magnitude, RTOL[dtype], what)


# --- properties ----------------------------------------------------------------

@pytest.mark.parametrize("tp", TPS)
@FUZZ
@given(data=st.data())
def test_gemm_rs_property(ranks, tp, data):
    case = _draw_common(data, tp)
    n = case["n"]
    k = tp * data.draw(st.integers(1, 64), label="K_r")
    n_out = data.draw(st.integers(1, 96), label="N")
    dtype = data.draw(st.sampled_from(FP_DTYPES), label="dtype")
    bias_mode = data.draw(st.sampled_from(["none", "all", "rank0"]), label="bias")
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(n, k, generator=g).to(dtype)
    w = (torch.randn(n_out, k, generator=g) / math.sqrt(k)).to(dtype)
    b = None if bias_mode == "none" else torch.randn(n_out, generator=g).to(dtype)

    results = ranks(tp).run(_gemm_rs_on_rank, x, w, b, bias_mode == "rank0", case["threshold"],
                            case["enabled"], case["chunks"])
    want = x.double() @ w.double().t()
    magnitude = x.double().abs() @ w.double().abs().t()
    if b is not None:
        want, magnitude = want + b.double(), magnitude + b.double().abs()
    what = f"gemm_rs tp={tp} n={n} K={k} N={n_out} {dtype} bias={bias_mode}"
    _check_row_parallel(results, want, magnitude, n, n_out, tp, dtype, what)
    _check_counts(results, _strategy(case, tp), what)


@pytest.mark.parametrize("tp", TPS)
@FUZZ
@given(data=st.data())
def test_ag_gemm_property(ranks, tp, data):
    case = _draw_common(data, tp)
    n = case["n"]
    k = data.draw(st.integers(1, 128), label="K")
    n_out = tp * data.draw(st.integers(1, 32), label="N_r")
    dtype = data.draw(st.sampled_from(FP_DTYPES), label="dtype")
    with_bias = data.draw(st.booleans(), label="bias")
    gather_output = data.draw(st.booleans(), label="gather_output")
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(n, k, generator=g).to(dtype)
    w = (torch.randn(n_out, k, generator=g) / math.sqrt(k)).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if with_bias else None

    results = ranks(tp).run(_ag_gemm_on_rank, x, w, b, case["threshold"], case["enabled"],
                            gather_output, case["chunks"])
    want = x.double() @ w.double().t()
    magnitude = x.double().abs() @ w.double().abs().t()
    if b is not None:
        want, magnitude = want + b.double(), magnitude + b.double().abs()
    what = (f"ag_gemm tp={tp} n={n} K={k} N={n_out} {dtype} bias={with_bias} "
            f"gather_output={gather_output}")
    _check_column_parallel(results, want, magnitude, n, n_out, tp, dtype, gather_output, what)
    _check_counts(results, _strategy(case, tp), what)


@pytest.mark.parametrize("tp", TPS)
@FUZZ
@given(data=st.data())
def test_gemm_rs_w8a8_property(ranks, tp, data):
    case = _draw_common(data, tp)
    n = case["n"]
    mode = _draw_mode(data)
    k = tp * data.draw(st.integers(W8A8_MIN_K, 64), label="K_r")
    n_out = data.draw(st.integers(1, 96), label="N")
    out_dtype = data.draw(st.sampled_from(W8A8_OUT), label="out_dtype")
    bias_dtype = data.draw(st.sampled_from([None, torch.float32, torch.bfloat16]), label="bias")
    g = torch.Generator().manual_seed(case["seed"])
    q = _draw_w8a8(data, g, mode, n, k, n_out)
    b = None if bias_dtype is None else torch.randn(n_out, generator=g).to(bias_dtype)

    results = ranks(tp).run(_gemm_rs_w8a8_on_rank, q["x"], q["w_q"], q["w_scale"], q["scale"],
                            q["zp"], b, out_dtype, case["threshold"], case["enabled"],
                            case["chunks"])
    # Every rank quantises its own K-slice (dynamic scales are per rank); the
    # dequantised partials are summed.
    partials = [w8a8_linear(feature_slice(q["x"], tp, r, dim=1),
                            feature_slice(q["w_q"], tp, r, dim=1), q["w_scale"], q["scale"],
                            q["zp"]).double() for r in range(tp)]
    want = sum(partials)
    magnitude = sum(p.abs() for p in partials)
    if b is not None:
        want, magnitude = want + b.double(), magnitude + b.double().abs()
    what = (f"gemm_rs_w8a8 tp={tp} n={n} K={k} N={n_out} mode={q['mode']} x={q['x'].dtype} "
            f"w_scale={tuple(q['w_scale'].shape)} out={out_dtype} bias={bias_dtype}")
    _check_row_parallel(results, want, magnitude, n, n_out, tp, out_dtype, what)
    _check_counts(results, _strategy(case, tp), what)


@pytest.mark.parametrize("tp", TPS)
@FUZZ
@given(data=st.data())
def test_ag_gemm_w8a8_property(ranks, tp, data):
    case = _draw_common(data, tp)
    n = case["n"]
    mode = _draw_mode(data)
    k = data.draw(st.integers(W8A8_MIN_K, 128), label="K")
    if mode in PER_TOKEN_MODES:
        k = -(-k // AG_PER_TOKEN_K_MULTIPLE) * AG_PER_TOKEN_K_MULTIPLE
    n_out = tp * data.draw(st.integers(1, 32), label="N_r")
    out_dtype = data.draw(st.sampled_from(W8A8_OUT), label="out_dtype")
    bias_dtype = data.draw(st.sampled_from([None, torch.float32, torch.bfloat16]), label="bias")
    gather_output = data.draw(st.booleans(), label="gather_output")
    g = torch.Generator().manual_seed(case["seed"])
    q = _draw_w8a8(data, g, mode, n, k, n_out)
    b = None if bias_dtype is None else torch.randn(n_out, generator=g).to(bias_dtype)

    results = ranks(tp).run(_ag_gemm_w8a8_on_rank, q["x"], q["w_q"], q["w_scale"], q["scale"],
                            q["zp"], b, out_dtype, case["threshold"], case["enabled"],
                            gather_output, case["chunks"])
    product = w8a8_linear(q["x"], q["w_q"], q["w_scale"], q["scale"], q["zp"]).double()
    want, magnitude = product, product.abs()
    if b is not None:
        want, magnitude = want + b.double(), magnitude + b.double().abs()
    what = (f"ag_gemm_w8a8 tp={tp} n={n} K={k} N={n_out} mode={q['mode']} x={q['x'].dtype} "
            f"w_scale={tuple(q['w_scale'].shape)} out={out_dtype} bias={bias_dtype} "
            f"gather_output={gather_output}")
    _check_column_parallel(results, want, magnitude, n, n_out, tp, out_dtype, gather_output, what)
    _check_counts(results, _strategy(case, tp), what)
