"""The fused add + RMSNorm CPU kernel (csrc/kernels/cpu/add_rms_norm*), exercised
through the public op ``torch.ops.flashcomm.sp_add_rms_norm`` on a 1-rank gloo
group (tp = 1: replicated, normed and residual valid on every row), against an
independent dense reference, on this machine and in a child per CPU view below it
(``tests/_isa.py``), and vLLM's ``fused_add_rms_norm`` (the kernel vLLM loads on that
CPU: ``_C``, ``_C_AVX512`` or ``_C_AVX2``) against the same reference."""

from __future__ import annotations

import os
from typing import Iterator, Optional

import pytest
import torch
import torch.distributed as dist

import flashcomm  # noqa: F401  (registers torch.ops.flashcomm)

from _isa import LOWER_VIEWS, check_requested_view_is_active, rerun_module_in_view

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes, one under / at / over a vector, a vLLM size, a non-multiple of 16,
# and one past the largest common H with a ragged tail.
HIDDEN_SIZES = [1, 7, 15, 16, 17, 640, 1000, 4096 + 3]
ROW_COUNTS = [0, 1, 3, 64]
# contiguous: fresh [m, H]; strided: rows of a wider tensor, at an offset;
# broadcast: one row expanded to m (row stride 0).
LAYOUTS = ["contiguous", "strided", "broadcast"]
# same: weight in x's dtype (vLLM's case); float32 / float16: converted to x's dtype first.
WEIGHT_DTYPES = [None, torch.float32, torch.float16]
EPS = 1e-6
SP_THRESHOLD = 1000
SEED = 0
# The view tests rerun this module in a child per CPU view; the child skips the tests
# that do not depend on the kernels' ISA.
_CHILD_ENV = "FLASHCOMM_NORM_ISA_CHILD"


@pytest.fixture(scope="module")
def group_name(tmp_path_factory) -> Iterator[str]:
    """The c10d name of a 1-rank gloo group (this process)."""
    created = False
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path_factory.mktemp("norm_store") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    if dist.get_world_size() != 1:
        pytest.skip("needs a 1-rank default group; this process is in a larger one")
    try:
        yield dist.group.WORLD.group_name
    finally:
        if created:
            dist.destroy_process_group()


def sp_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
            group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, residual_out) of the op on tp = 1 (replicated: every row)."""
    return torch.ops.flashcomm.sp_add_rms_norm(x, residual, weight, EPS, group_name,
                                               SP_THRESHOLD, True, False)


def _scaled(x: torch.Tensor, residual: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s in fp32, s * rsqrt(mean(s^2) + eps) in float64)."""
    s32 = x.float() if residual is None else x.float() + residual.float()
    s = s32.double()
    return s32, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)


def reference(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract in float64, rounding only where it rounds: s = x + residual
    in fp32, residual_out = s in x's dtype, normed = round(s * inv_rms) * weight
    for 16-bit dtypes (s * inv_rms * weight for fp32), weight in x's dtype."""
    dtype = x.dtype
    s32, scaled = _scaled(x, residual)
    if dtype != torch.float32:
        scaled = scaled.to(dtype).double()
    normed = (scaled * weight.to(dtype).double()).to(dtype)
    return normed, s32.to(dtype)


def composite(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-kernel ATen expression (still the path of other devices), which
    defines the NaN/Inf behaviour."""
    s = x.float() if residual is None else x.float() + residual.float()
    normed = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return normed * weight.to(x.dtype), s.to(x.dtype)


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values at |t| (float64; subnormals get the smallest normal's)."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(t.abs().double().clamp_min(fi.tiny)))) * fi.eps


def assert_within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int) -> None:
    """Elementwise |got - want| <= ulps spacings of got's dtype at the larger magnitude."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.double() - want.double()).abs()
    bound = ulps * ulp(torch.maximum(got.abs(), want.abs()), got.dtype)
    bad = diff > bound
    assert not bad.any(), (
        f"{int(bad.sum())} of {got.numel()} elements off by more than {ulps} ulp(s); "
        f"worst |diff| {diff.max().item():.3g}, e.g. got {got[bad][:4].tolist()} "
        f"want {want[bad][:4].tolist()}")


def _neighbour_toward(t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The 16-bit value next to each t on target's side (t != 0)."""
    bits = t.view(torch.int16)
    away_from_zero = target.abs() > t.double().abs()
    return torch.where(away_from_zero, bits + 1, bits - 1).to(torch.int16).view(t.dtype)


def assert_normed_matches(got: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                          weight: torch.Tensor) -> None:
    """fp32: within 1e-5 relative of the reference. 16-bit: bitwise equal to the
    reference, except where s * inv_rms lies so close to a rounding midpoint of the
    dtype that the fp32 sum of squares (its error bound, any ISA's summation order)
    may round it to the other neighbour; there the result of that neighbour counts."""
    want, _ = reference(x, residual, weight)
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    dtype, hidden = got.dtype, got.shape[-1]
    _, scaled = _scaled(x, residual)
    rounded = scaled.to(dtype)
    neighbour = _neighbour_toward(rounded, scaled)
    midpoint = (rounded.double() + neighbour.double()) / 2
    rel_bound = 2.0**-24 * (hidden / 8 + 8)
    near = ((scaled - midpoint).abs() <= rel_bound * scaled.abs()) & (rounded != 0)
    w = weight.to(dtype).double()
    alternative = (neighbour.double() * w).to(dtype)
    ok = (got == want) | (near & (got == alternative)) | (got.isnan() & want.isnan())
    assert ok.all(), (
        f"{int((~ok).sum())} of {got.numel()} elements differ from the reference, e.g. "
        f"got {got[~ok][:4].tolist()} want {want[~ok][:4].tolist()}")


def make_rows(m: int, hidden: int, dtype: torch.dtype, layout: str, g: torch.Generator,
              scale: float = 1.0) -> torch.Tensor:
    """[m, hidden] rows; `strided`: rows 2..m+1, columns 5.. of a wider tensor;
    `broadcast`: one random row repeated by a zero row stride."""
    if layout == "contiguous":
        return (scale * torch.randn(m, hidden, generator=g)).to(dtype)
    if layout == "broadcast":
        return (scale * torch.randn(1, hidden, generator=g)).to(dtype).expand(m, hidden)
    wide = (scale * torch.randn(m + 3, 2 * hidden + 7, generator=g)).to(dtype)
    rows = wide.narrow(0, 2, m).narrow(1, 5, hidden)
    assert rows.stride() == (2 * hidden + 7, 1)
    return rows


def make_weight(hidden: int, dtype: torch.dtype, g: torch.Generator,
                weight_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return (1 + 0.25 * torch.randn(hidden, generator=g)).to(weight_dtype or dtype)


def child_skip() -> None:
    if os.environ.get(_CHILD_ENV):
        pytest.skip("ISA-independent: runs in the parent process only")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("m", ROW_COUNTS)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_reference(group_name, dtype, hidden, m, with_residual, layout):
    g = torch.Generator().manual_seed(SEED + 7 * hidden + m)
    x = make_rows(m, hidden, dtype, layout, g)
    # A residual larger than x, as in a deep model's hidden state.
    residual = make_rows(m, hidden, dtype, layout, g, scale=4.0) if with_residual else None
    weight = make_weight(hidden, dtype, g)
    x_before = x.clone()
    residual_before = None if residual is None else residual.clone()

    normed, residual_out = sp_norm(x, residual, weight, group_name)

    _, want_residual = reference(x, residual, weight)
    assert normed.shape == residual_out.shape == (m, hidden)
    assert normed.dtype == residual_out.dtype == dtype
    assert torch.equal(residual_out, want_residual)  # s in fp32, rounded once
    assert_normed_matches(normed, x, residual, weight)
    assert torch.equal(x, x_before)  # inputs untouched (the op is functional)
    if residual is not None:
        assert torch.equal(residual, residual_before)


@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
@pytest.mark.parametrize("hidden", [17, 640])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_dtype_and_stride(group_name, dtype, hidden, weight_dtype):
    """A weight of another floating dtype, or a non-contiguous one, is used as
    weight.to(x.dtype) (converted once per call)."""
    g = torch.Generator().manual_seed(SEED + hidden)
    x = make_rows(5, hidden, dtype, "contiguous", g)
    residual = make_rows(5, hidden, dtype, "contiguous", g)
    weight = make_weight(hidden, dtype, g, weight_dtype)
    strided_weight = torch.stack([weight, -weight], dim=1)[:, 0]  # stride 2
    assert strided_weight.stride() == (2,)
    _, want_residual = reference(x, residual, weight)
    for w in (weight, strided_weight):
        normed, residual_out = sp_norm(x, residual, w, group_name)
        assert torch.equal(residual_out, want_residual)
        assert_normed_matches(normed, x, residual, weight)


@pytest.mark.parametrize("hidden", [7, 640])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_rows(group_name, dtype, hidden):
    """A NaN in s makes its row's normed all NaN; an Inf makes that element NaN
    and the rest of the row zero (inv_rms = 0), as the ATen composite does.
    residual_out still holds s. Other rows are unaffected."""
    g = torch.Generator().manual_seed(SEED + hidden + 1)
    x = make_rows(5, hidden, dtype, "contiguous", g)
    residual = make_rows(5, hidden, dtype, "contiguous", g)
    weight = make_weight(hidden, dtype, g)
    last = hidden - 1  # in the scalar tail when hidden is not a multiple of the vector
    x[0, 3] = float("nan")
    residual[1, last] = float("inf")
    x[2, 0], residual[2, 0] = float("-inf"), float("inf")  # s = NaN
    x[3, 1] = float("-inf")

    normed, residual_out = sp_norm(x, residual, weight, group_name)

    _, want_residual = composite(x, residual, weight)
    torch.testing.assert_close(residual_out, want_residual, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(normed[0]).all() and torch.isnan(normed[2]).all()
    for row, col in ((1, last), (3, 1)):
        assert torch.isnan(normed[row, col])
        others = torch.cat([normed[row, :col], normed[row, col + 1:]])
        assert (others == 0).all()
    assert torch.isinf(residual_out[1, last]) and torch.isinf(residual_out[3, 1])
    assert torch.isfinite(normed[4]).all()
    assert_normed_matches(normed[4:], x[4:], residual[4:], weight)


@pytest.mark.parametrize("hidden", [17, 640])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denormal_values(group_name, dtype, hidden):
    """Denormal s (residual_out) and denormal normed values round like every
    other value (bf16 has fp32's exponent range; a conversion instruction that
    flushes denormals to zero would fail this)."""
    g = torch.Generator().manual_seed(SEED + hidden + 2)
    x = (1e-39 * torch.randn(3, hidden, generator=g)).to(dtype)
    residual = (1e-39 * torch.randn(3, hidden, generator=g)).to(dtype)
    x[1] = (1e-22 * torch.randn(hidden, generator=g)).to(dtype)  # tiny next to one huge:
    x[1, 0] = 1e18  # normed of the tiny ones is ~1e-40, denormal
    residual[1] = 0
    weight = make_weight(hidden, dtype, g)
    normed, residual_out = sp_norm(x, residual, weight, group_name)
    _, want_residual = reference(x, residual, weight)
    assert (want_residual[0].abs() < torch.finfo(torch.float32).tiny).all()
    assert torch.equal(residual_out, want_residual)
    subnormal = (normed[1].abs() < torch.finfo(torch.float32).tiny) & (normed[1] != 0)
    assert subnormal.sum() > hidden // 2
    assert_normed_matches(normed, x, residual, weight)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_composite_path(group_name, dtype, with_residual):
    """Inputs the kernel does not take (float64; rows with a non-unit element
    stride) run the ATen composite and give the same contract."""
    child_skip()
    g = torch.Generator().manual_seed(SEED + 3)
    hidden, m = 33, 6
    x = torch.randn(hidden, m, generator=g).to(dtype).t()  # element stride m
    residual = torch.randn(hidden, m, generator=g).to(dtype).t() if with_residual else None
    weight = make_weight(hidden, dtype, g)
    assert x.stride(1) == m
    normed, residual_out = sp_norm(x, residual, weight, group_name)
    want_normed, want_residual = reference(x, residual, weight)
    assert torch.equal(residual_out, want_residual)
    if dtype == torch.float64:  # the composite computes in fp32 too
        torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-6)
    else:
        assert_normed_matches(normed, x, residual, weight)


def test_requested_view_is_active():
    check_requested_view_is_active(_CHILD_ENV)


# The norm uses no extension beyond AVX512-BF16, which "no-amx" keeps: that view runs this
# machine's own path, so it is not rerun.
NORM_VIEWS = [v for v in LOWER_VIEWS if v != "no-amx"]


@pytest.mark.parametrize("view", NORM_VIEWS)
def test_cpu_view(view):
    """Reruns the kernel tests of this module, and the comparison with the vLLM kernel
    of that CPU class, in a child that sees CPU view ``view``."""
    child_skip()
    rerun_module_in_view(__file__, view, _CHILD_ENV, "cpu_view", len(DTYPES) * len(HIDDEN_SIZES),
                         timeout_s=1200)


# --- against vLLM's CPU kernel ----------------------------------------------

# vLLM's CPU fused_add_rms_norm needs H to be a multiple of its vector width.
VLLM_HIDDEN_SIZES = [h for h in HIDDEN_SIZES if h % 16 == 0] + [4096]
VLLM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def vllm_fused_add_rms_norm():
    """torch.ops._C.fused_add_rms_norm (in place: input <- normed, residual <- s), from
    the library vLLM loads for this CPU (or view)."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's _C ops)
    except Exception as exc:  # not installed, or a build for another torch/device
        pytest.skip(f"vLLM is not importable: {type(exc).__name__}: {exc}")
    op = getattr(getattr(torch.ops, "_C", None), "fused_add_rms_norm", None)
    if op is None:
        pytest.skip("vLLM imported but torch.ops._C.fused_add_rms_norm is not registered")
    return op


def ulps_from_exact(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in spacings of got's dtype at |exact| (float64)."""
    return (got.double() - exact).abs() / ulp(exact, got.dtype)


# Each kernel against the exact value (float64, no rounding), in ulps of the dtype: vLLM
# promises no rounding sequence, only a fused add + RMSNorm, so neither is compared bit
# for bit with the other. residual_out is the fp32 sum rounded once in flashcomm's
# contract (bitwise); vLLM's AVX2 kernel rounds some bf16 sums to the other neighbour
# (within 1 ulp). flashcomm's 16-bit normed is round(round(s * inv_rms) * w): within 2
# ulps of the exact value. vLLM's normalises s rounded to the dtype (on AVX2 up to 1 ulp
# off, which the scaling can turn into 2 ulps of the result) and rounds once: within 3.
RESIDUAL_ULPS = 1.0
NORMED_ULPS = {"flashcomm": 2.0, "vllm": 3.0}
FP32_RTOL = 1e-5


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("m", ROW_COUNTS)
@pytest.mark.parametrize("hidden", VLLM_HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", VLLM_DTYPES)
def test_matches_vllm(group_name, vllm_fused_add_rms_norm, dtype, hidden, m, with_residual):
    g = torch.Generator().manual_seed(SEED + 11 * hidden + m)
    x = make_rows(m, hidden, dtype, "contiguous", g)
    residual = make_rows(m, hidden, dtype, "contiguous", g, 4.0) if with_residual else None
    weight = make_weight(hidden, dtype, g)

    normed, residual_out = sp_norm(x, residual, weight, group_name)

    # vLLM works in place; without a residual, a zero one gives s = x.
    vllm_normed = x.clone()
    vllm_residual = residual.clone() if with_residual else torch.zeros_like(x)
    vllm_fused_add_rms_norm(vllm_normed, vllm_residual, weight, EPS)

    s32, scaled = _scaled(x, residual)
    exact_normed = scaled * weight.double()
    for name, got_normed, got_residual in (("flashcomm", normed, residual_out),
                                           ("vllm", vllm_normed, vllm_residual)):
        context = f"{name} {dtype} H={hidden} m={m} residual={with_residual}"
        if name == "flashcomm":  # the contract: the fp32 sum rounded once
            assert torch.equal(got_residual, s32.to(dtype)), f"{context}: residual_out"
        else:  # vLLM's AVX2 kernel rounds some bf16 sums to the other neighbour
            off = ulps_from_exact(got_residual, s32.double())
            assert (off <= RESIDUAL_ULPS).all(), (
                f"{context}: residual_out {off.max():.2f} ulps from the exact sum")
        if dtype == torch.float32:
            torch.testing.assert_close(got_normed.double(), exact_normed, rtol=FP32_RTOL,
                                       atol=1e-6, msg=lambda msg: f"{context}: {msg}")
            continue
        off, bound = ulps_from_exact(got_normed, exact_normed), NORMED_ULPS[name]
        assert (off <= bound).all(), (
            f"{context}: {int((off > bound).sum())} of {off.numel()} elements more than "
            f"{bound} ulps from the exact value (worst {off.max():.2f})")
