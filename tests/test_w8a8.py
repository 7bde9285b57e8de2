"""gemm_rs_w8a8 and ag_gemm_w8a8 on real gloo groups against the dense W8A8
reference (flashcomm.tools.reference), plus exactness of the int32 accumulation and
the error of the dequantised result against the fp32 product."""

from __future__ import annotations

import pytest
import torch

import flashcomm
from flashcomm.tools.reference import (feature_slice, gemm_rs_w8a8_reference, int8_gemm,
                                       quantize_dynamic, quantize_weight_per_channel,
                                       relative_error, token_shard, w8a8_linear)

from _cases import (RTOL, THRESHOLD, TPS, assert_ran, call_and_count, expected_strategy,
                    rank_and_size, token_counts)
from _isa import LOWER_VIEWS, check_requested_view_is_active, in_child, rerun_module_in_view

K, N = 64, 48
MODES = ["dynamic", "static", "static_asym", "int8_static", "int8_per_token"]
OUT_DTYPES = [torch.float32, torch.bfloat16]
# Dequantised W8A8 vs the fp32 product on N(0, 1) data, per-channel weights and
# dynamic per-token activations: max |diff| / max |fp32| stays below this.
W8A8_VS_FP32_RTOL = 0.03


def _inputs(n, mode, with_bias, seed=2):
    """Full (all-rank) inputs: x [n, K], int8 weight [N, K] + per-channel scale,
    quantisation parameters for `mode`, bias [N]."""
    g = torch.Generator().manual_seed(seed + n)
    x = torch.randn(n, K, generator=g)
    w_q, w_scale = quantize_weight_per_channel(torch.randn(N, K, generator=g))
    bias = torch.randn(N, generator=g) if with_bias else None
    scale = zp = None
    if mode in ("static", "static_asym", "int8_static"):
        scale = torch.tensor([4.0 / 127.0])
    if mode == "static_asym":
        zp = torch.tensor([5], dtype=torch.int32)
    if mode == "int8_static":
        x = torch.randint(-128, 128, (n, K), generator=g, dtype=torch.int8)
    if mode == "int8_per_token":
        x, scale = quantize_dynamic(x)
    return x, w_q, w_scale, scale, zp, bias


def _gemm_rs_w8a8_on_rank(x_full, w_q, w_scale, scale, zp, bias, out_dtype, threshold):
    rank, tp = rank_and_size()
    x = feature_slice(x_full, tp, rank, dim=1)
    w = feature_slice(w_q, tp, rank, dim=1)
    return call_and_count("gemm_rs_w8a8", flashcomm.gemm_rs_w8a8, x, w, w_scale, scale, zp,
                          bias, None, out_dtype, threshold)


def _ag_gemm_w8a8_on_rank(x_full, w_q, w_scale, scale, zp, bias, out_dtype, threshold,
                          gather_output):
    rank, tp = rank_and_size()
    n = x_full.shape[0]
    x = token_shard(x_full, tp, rank, fill=0 if x_full.dtype == torch.int8 else float("nan"))
    if scale is not None and scale.dim() == 2:  # per-token scales travel with their rows
        scale = token_shard(scale, tp, rank)
    w = feature_slice(w_q, tp, rank, dim=0)
    s = w_scale if w_scale.numel() == 1 else feature_slice(w_scale, tp, rank, dim=0)
    b = None if bias is None else feature_slice(bias, tp, rank, dim=0)
    return call_and_count("ag_gemm_w8a8", flashcomm.ag_gemm_w8a8, x, w, s, scale, zp, b, None,
                          n, out_dtype, threshold, True, gather_output)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tp", TPS)
def test_gemm_rs_w8a8_matches_dense(ranks, tp, mode, out_dtype, with_bias):
    pool = ranks(tp)
    for n in token_counts(tp):
        x, w_q, w_scale, scale, zp, bias = _inputs(n, mode, with_bias)
        results = pool.run(_gemm_rs_w8a8_on_rank, x, w_q, w_scale, scale, zp, bias, out_dtype,
                           THRESHOLD)
        full = torch.cat([out for out, _ in results])
        assert full.dtype == out_dtype
        assert torch.all(full[n:] == 0), "padding rows must be zero"
        want = gemm_rs_w8a8_reference(x, w_q, w_scale, scale, zp, bias, tp, x_scale_full=scale)
        assert relative_error(full[:n], want) <= RTOL[out_dtype], (n, mode)
        for _, counts in results:
            assert_ran(counts, expected_strategy(n, tp, THRESHOLD))


@pytest.mark.parametrize("gather_output", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tp", TPS)
def test_ag_gemm_w8a8_matches_dense(ranks, tp, mode, out_dtype, with_bias, gather_output):
    pool = ranks(tp)
    for n in token_counts(tp):
        x, w_q, w_scale, scale, zp, bias = _inputs(n, mode, with_bias)
        results = pool.run(_ag_gemm_w8a8_on_rank, x, w_q, w_scale, scale, zp, bias, out_dtype,
                           THRESHOLD, gather_output)
        want = w8a8_linear(x, w_q, w_scale, scale, zp, bias)
        outs = [out for out, _ in results]
        got = outs if gather_output else [torch.cat(outs, dim=1)]
        for full in got:
            assert full.shape == (n, N) and full.dtype == out_dtype
            assert relative_error(full, want) <= RTOL[out_dtype], (n, mode)
        for _, counts in results:
            assert_ran(counts, expected_strategy(n, tp, THRESHOLD))


def _exact_on_rank(x_full, w_q, op):
    rank, tp = rank_and_size()
    one = torch.ones(1)
    if op == "gemm_rs_w8a8":
        x = feature_slice(x_full, tp, rank, dim=1)
        w = feature_slice(w_q, tp, rank, dim=1)
        return flashcomm.gemm_rs_w8a8(x, w, one, one, None, None, None, torch.float32, 0)
    x = token_shard(x_full, tp, rank)
    w = feature_slice(w_q, tp, rank, dim=0)
    return flashcomm.ag_gemm_w8a8(x, w, one, one, None, None, None, x_full.shape[0],
                                  torch.float32, 0, True, True)


@pytest.mark.parametrize("op", ["gemm_rs_w8a8", "ag_gemm_w8a8"])
@pytest.mark.parametrize("tp", [1, 2])
def test_int32_accumulation_is_exact(ranks, tp, op):
    """Unit scales expose the raw accumulator. Full-range int8 with K = 256 keeps
    |acc| <= 2^22, so float32 holds it exactly: it must equal the integer GEMM."""
    g = torch.Generator().manual_seed(3)
    n, k = 67, 256
    x = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (32, k), generator=g, dtype=torch.int8)
    want = int8_gemm(x, w)
    outs = ranks(tp).run(_exact_on_rank, x, w, op)
    got = torch.cat(outs)[:n] if op == "gemm_rs_w8a8" else outs[0]
    assert torch.equal(got.to(torch.int64), want)


def _dynamic_w8a8_on_rank(x, w_q, w_scale):
    return flashcomm.gemm_rs_w8a8(x, w_q, w_scale, None, None, None, None, torch.float32)


def test_dequantised_result_close_to_fp32(ranks):
    """The op's W8A8 result (dynamic per-token, per-channel weights) is within
    W8A8_VS_FP32_RTOL of the fp32 product, and not identical to it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 1024, generator=g)
    w = torch.randn(256, 1024, generator=g)
    w_q, w_scale = quantize_weight_per_channel(w)
    got = ranks(1).run(_dynamic_w8a8_on_rank, x, w_q, w_scale)[0]
    err = relative_error(got, x.double() @ w.double().t())
    assert 0 < err <= W8A8_VS_FP32_RTOL


# --- CPU views ------------------------------------------------------------------------

# AVX2 only (AMD Zen 2/3): int8 GEMMs without VNNI. The kernels of every view are covered
# by tests/test_quant_kernels.py.
W8A8_VIEWS = [v for v in LOWER_VIEWS if v == "avx2"]
_CHILD_ENV = "FLASHCOMM_W8A8_VIEW_CHILD"


def test_requested_view_is_active():
    check_requested_view_is_active(_CHILD_ENV)


@pytest.mark.parametrize("view", W8A8_VIEWS)
def test_cpu_view(view):
    """Reruns this module's tests on real gloo groups in a child that sees ``view``."""
    if in_child(_CHILD_ENV):
        pytest.skip("runs in the parent process only")
    # The int8 paths do not depend on the transport: c10d is left to the parent.
    rerun_module_in_view(__file__, view, _CHILD_ENV, "cpu_view or c10d", 50)
