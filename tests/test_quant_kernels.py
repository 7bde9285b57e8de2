"""The W8A8 CPU kernels (csrc/kernels/cpu/quant*: per-token and static quantisation
straight into the GEMM's input or the all-gather payload, dequantisation into the
output) and the int8 GEMMs (plain ``_int_mm`` and the packed oneDNN weight),
exercised through the public ops ``gemm_rs_w8a8`` / ``ag_gemm_w8a8`` /
``sp_*_linear_w8a8`` on a 1-rank gloo group against an independent reference
written here, on this machine and in a child process per CPU view below it
(``tests/_isa.py``: ATen's, oneDNN's and flashcomm's dispatch capped together).

The reference follows the numerics contract of csrc/ops/quant.h step by step in
float32 (quantise, exact integer GEMM, then ``((acc - zp*rowsum) * s_x) * s_w +
bias``, each step rounded to float32, one rounding to the output dtype), so the
kernels must match it **bitwise**, NaN positions included.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
import torch.distributed as dist

import flashcomm

from _isa import LOWER_VIEWS, check_requested_view_is_active, rerun_module_in_view
from flashcomm.weights import is_packed, packing_supported, packs_by_default, prepare_linear

# dynamic: per-token from float x; static(_asym): per-tensor scale (+ zero point);
# int8_*: x already quantised, per-tensor or per-token scales.
FLOAT_MODES = ["dynamic", "static", "static_asym"]
INT8_MODES = ["int8_per_tensor", "int8_per_token"]
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One element, under / at / over a vector of int8 lanes, and a ragged large K.
K_SIZES = [1, 7, 16, 17, 512 + 3]
ROW_COUNTS = [0, 1, 16, 17, 200]
N = 37  # a vector or two of output columns plus a ragged tail, for every ISA
WEIGHTS = ["plain", "packed"]
NAN, INF = float("nan"), float("inf")
STATIC_SCALE = 0.05
ZERO_POINT = 7
SEED = 0
# The view tests rerun this module in a child per CPU view; the child skips the tests
# that do not depend on the kernels' ISA.
_CHILD_ENV = "FLASHCOMM_QUANT_ISA_CHILD"


@pytest.fixture(scope="module")
def group_name(tmp_path_factory) -> str:
    """The c10d name of a 1-rank gloo group (this process)."""
    created = False
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path_factory.mktemp("quant_store") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    if dist.get_world_size() != 1:
        pytest.skip("needs a 1-rank default group; this process is in a larger one")
    try:
        yield dist.group.WORLD.group_name
    finally:
        if created:
            dist.destroy_process_group()


# --- the independent reference ------------------------------------------------

def ref_quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: s = absmax / 127 (NaN if the row holds a NaN), q =
    round_half_even(x / s) (x / 1 for s == 0), NaN -> 0, clamped to [-127, 127]."""
    xf = x.float()
    absmax = xf.abs().amax(dim=1, keepdim=True) if xf.shape[0] else xf.new_zeros(0, 1)
    absmax = torch.where(xf.isnan().any(dim=1, keepdim=True), NAN, absmax)
    scale = absmax / 127.0
    safe = torch.where(scale == 0, 1.0, scale)
    q = torch.nan_to_num(torch.round(xf / safe), nan=0.0).clamp(-127, 127)
    return q.to(torch.int8), scale


def ref_quantize_static(x: torch.Tensor, scale: torch.Tensor,
                        zero_point: Optional[torch.Tensor]) -> torch.Tensor:
    """q = round_half_even(x / s) (+ zp, in float32), NaN -> 0, clamped to [-128, 127]."""
    v = torch.round(x.float() / scale)
    if zero_point is not None:
        v = v + zero_point.float()
    return torch.nan_to_num(v, nan=0.0).clamp(-128, 127).to(torch.int8)


def ref_output(q: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               zero_point: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               out_dtype: torch.dtype) -> torch.Tensor:
    """Exact integer GEMM (float64 sums of int8 products are exact), then the
    dequantisation one float32 step at a time."""
    acc = (q.double() @ w.double().t()).to(torch.int64)
    y = acc.to(torch.float32)
    if zero_point is not None:
        y = y - w.to(torch.int64).sum(dim=1).float() * zero_point.float()
    y = y * x_scale.float().reshape(-1, 1)
    y = y * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def reference(mode: str, x: torch.Tensor, scale: Optional[torch.Tensor],
              zero_point: Optional[torch.Tensor], w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    if mode == "dynamic":
        q, s = ref_quantize_dynamic(x)
    elif mode in ("static", "static_asym"):
        q, s = ref_quantize_static(x, scale, zero_point), scale
    else:
        q, s = x, scale
    return ref_output(q, s, w, w_scale, zero_point, bias, out_dtype)


# --- inputs --------------------------------------------------------------------

def special_rows(K: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows with a defined edge behaviour: all zero; a NaN; +Inf; -Inf; values past
    the int8 range of the static scale; values whose dynamic scale underflows to 0
    (float32 only: the smallest subnormal / 127); exact halves of the static scale
    (round half to even)."""
    rows = torch.randn(7, K)
    rows[0] = 0.0
    rows[1, K // 2] = NAN
    rows[2, 0] = INF
    rows[3, K - 1] = -INF
    rows[4] = torch.linspace(-1e4, 1e4, K)
    rows[5] = torch.full((K,), 1e-45) if dtype == torch.float32 else 0.0
    rows[6] = (torch.arange(K) - K // 2 + 0.5) * STATIC_SCALE
    return rows.to(dtype)


def make_inputs(mode: str, m: int, K: int, x_dtype: torch.dtype, g: torch.Generator):
    """x [m, K], input_scale, input_zero_point for `mode`."""
    if mode in INT8_MODES:
        x = torch.randint(-128, 128, (m, K), generator=g, dtype=torch.int8)
        if mode == "int8_per_tensor":
            return x, torch.tensor([STATIC_SCALE]), None
        scale = torch.rand(m, 1, generator=g) * 0.1
        if m > 2:
            scale[1] = 0.0
        return x, scale, None
    x = (torch.randn(m, K, generator=g) * 2).to(x_dtype)
    if m >= 16:
        x[:7] = special_rows(K, x_dtype)
    if mode == "dynamic":
        return x, None, None
    zp = torch.tensor([ZERO_POINT], dtype=torch.int32) if mode == "static_asym" else None
    return x, torch.tensor([STATIC_SCALE]), zp


def make_weight(K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-range int8 weight [N, K] and per-channel scales [N]."""
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    return w, torch.rand(N, generator=g) * 0.02 + 1e-3


def prepared(w: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "plain":
        return w
    if not packing_supported(torch.int8):
        pytest.skip("this CPU cannot pack int8 weights")
    return prepare_linear(w, pack=True)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, context) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (context, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{context}: {m}")


def child_skip() -> None:
    if os.environ.get(_CHILD_ENV):
        pytest.skip("ISA-independent: runs in the parent process only")


# --- the ops against the reference ---------------------------------------------

def _run_all_ops(group_name, mode, x_dtype, out_dtype, K, weight_kind):
    g = torch.Generator().manual_seed(SEED + 31 * K)
    w, w_scale_channel = make_weight(K, g)
    w_op = prepared(w, weight_kind)
    for i, m in enumerate(ROW_COUNTS):
        x, scale, zp = make_inputs(mode, m, K, x_dtype, g)
        bias = torch.randn(N, generator=g) if i % 2 else None
        w_scale = w_scale_channel if i % 3 else w_scale_channel[:1].clone()
        want = reference(mode, x, scale, zp, w, w_scale, bias, out_dtype)
        context = (mode, x_dtype, out_dtype, K, m, weight_kind)
        got = flashcomm.gemm_rs_w8a8(x, w_op, w_scale, scale, zp, bias, group_name, out_dtype)
        assert_bitwise(got, want, ("gemm_rs_w8a8",) + context)
        # The column op quantises into the all-gather payload (values + scale bytes).
        got = flashcomm.ag_gemm_w8a8(x, w_op, w_scale, scale, zp, bias, group_name, m, out_dtype)
        assert_bitwise(got, want, ("ag_gemm_w8a8",) + context)
        got = flashcomm.sp_row_linear_w8a8(x, w_op, w_scale, scale, zp, bias, group_name,
                                           out_dtype)
        assert_bitwise(got, want, ("sp_row_linear_w8a8",) + context)
        got = flashcomm.sp_column_linear_w8a8(x, w_op, w_scale, scale, zp, bias, group_name,
                                              out_dtype)
        assert_bitwise(got, want, ("sp_column_linear_w8a8",) + context)


@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("K", K_SIZES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_float_x_matches_reference(group_name, mode, x_dtype, out_dtype, K, weight_kind):
    _run_all_ops(group_name, mode, x_dtype, out_dtype, K, weight_kind)


@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("K", K_SIZES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("mode", INT8_MODES)
def test_int8_x_matches_reference(group_name, mode, out_dtype, K, weight_kind):
    _run_all_ops(group_name, mode, torch.int8, out_dtype, K, weight_kind)


def test_edge_rows_behave_as_documented(group_name):
    """The defined behaviours, stated directly (the bitwise tests imply them too):
    dynamic: an all-zero or underflowing row gives exactly the bias, a NaN or Inf
    row gives NaN everywhere; static: NaN contributes 0, Inf saturates."""
    child_skip()
    K = 64
    g = torch.Generator().manual_seed(SEED)
    w, w_scale = make_weight(K, g)
    bias = torch.randn(N, generator=g)
    x = special_rows(K, torch.float32)
    got = flashcomm.gemm_rs_w8a8(x, w, w_scale, None, None, bias, group_name, torch.float32)
    assert torch.equal(got[0], bias) and torch.equal(got[5], bias)
    assert torch.isnan(got[1:4]).all()
    assert torch.isfinite(got[4]).all() and torch.isfinite(got[6]).all()
    scale = torch.tensor([STATIC_SCALE])
    got = flashcomm.gemm_rs_w8a8(x, w, w_scale, scale, None, None, group_name, torch.float32)
    assert torch.isfinite(got).all()
    nan_as_zero = x[1].clone()
    nan_as_zero[K // 2] = 0.0
    alone = flashcomm.gemm_rs_w8a8(nan_as_zero[None], w, w_scale, scale, None, None, group_name,
                                   torch.float32)
    assert torch.equal(got[1], alone[0])


def test_zero_point_correction_follows_weight_changes(group_name):
    """zp * rowsum(W) is cached per weight (weak reference, version counter, data
    pointer): an in-place change or a storage swap of the weight is seen at the next
    call, and a weight made in inference mode (no version counter) is summed per call."""
    child_skip()
    K = 48
    g = torch.Generator().manual_seed(SEED + 1)
    w, w_scale = make_weight(K, g)
    x, scale, zp = make_inputs("static_asym", 20, K, torch.float32, g)

    def check(weight):
        got = flashcomm.gemm_rs_w8a8(x, weight, w_scale, scale, zp, None, group_name,
                                     torch.float32)
        assert_bitwise(got, reference("static_asym", x, scale, zp, weight, w_scale, None,
                                      torch.float32), "zero point")

    check(w)
    w.copy_(torch.randint(-128, 128, w.shape, generator=g, dtype=torch.int8))
    check(w)
    w[3].fill_(100)
    check(w)
    w.data = torch.randint(-128, 128, w.shape, generator=g, dtype=torch.int8)  # storage swap
    check(w)
    with torch.inference_mode():
        w_inf = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
        check(w_inf)
        w_inf.add_(1).clamp_(-128, 127)
        check(w_inf)


def test_larger_blocks(group_name):
    """Shapes past one parallel grain and a wide output (several vectors per row)."""
    child_skip()
    g = torch.Generator().manual_seed(SEED + 2)
    K, n_out, m = 1024 + 5, 300, 129
    w = torch.randint(-128, 128, (n_out, K), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n_out, generator=g) * 0.01
    x = torch.randn(m, K, generator=g).bfloat16()
    bias = torch.randn(n_out, generator=g)
    for kind in WEIGHTS:
        if kind == "packed" and not packing_supported(torch.int8):
            continue
        w_op = prepared(w, kind)
        got = flashcomm.gemm_rs_w8a8(x, w_op, w_scale, None, None, bias, group_name,
                                     torch.bfloat16)
        q, s = ref_quantize_dynamic(x)
        assert_bitwise(got, ref_output(q, s, w, w_scale, None, bias, torch.bfloat16), kind)


# --- worst-case int8 through the packed weight ----------------------------------

WORST_K = 4096


def test_packed_int8_worst_case_or_refused(group_name):
    """u8 255 against s8 -128 / 127 (int8 127 after oneDNN's s8 -> u8 shift), K = 4096,
    through the public op with a packed weight, bitwise against the exact result; or,
    where this CPU (or view) cannot pack int8 exactly, prepare_linear(pack=True) refuses
    with the reason and pack=None keeps the weight plain. Runs in every view child."""
    g = torch.Generator().manual_seed(SEED + 3)
    # Runs of four equal weights: every adjacent pair holds two equal extremes.
    signs = torch.where((torch.arange(WORST_K) // 4 + torch.arange(N)[:, None]) % 2 == 0, 1, -1)
    w = torch.where(signs > 0, 127, -128).to(torch.int8)
    w[:, -8:] = torch.randint(-128, 128, (N, 8), generator=g, dtype=torch.int8)
    x = torch.full((4, WORST_K), 127, dtype=torch.int8)
    x[1] = -128
    x[2] = torch.randint(-128, 128, (WORST_K,), generator=g, dtype=torch.int8)
    x[3, ::2] = -128
    scale = torch.tensor([STATIC_SCALE])
    w_scale = torch.rand(N, generator=g) * 0.02 + 1e-3
    want = ref_output(x, scale, w, w_scale, None, None, torch.float32)
    if packing_supported(torch.int8):
        w_op = prepare_linear(w, pack=True)
        assert is_packed(w_op)
        got = flashcomm.gemm_rs_w8a8(x, w_op, w_scale, scale, None, None, group_name,
                                     torch.float32)
        assert_bitwise(got, want, "packed int8, worst case")
        print(f"\n{flashcomm.cpu_features()}: int8 packs, exact at K = {WORST_K}")
    else:
        with pytest.raises(RuntimeError, match=r"cannot pack int8 weights \(.*not exact"):
            prepare_linear(w, pack=True)
        assert not packs_by_default(torch.int8, (N, WORST_K))
        assert not is_packed(prepare_linear(w))
        print(f"\n{flashcomm.cpu_features()}: int8 packing refused")
    # The plain weight is exact on every CPU.
    got = flashcomm.gemm_rs_w8a8(x, w, w_scale, scale, None, None, group_name, torch.float32)
    assert_bitwise(got, want, "plain int8, worst case")


# --- every CPU view below this machine -------------------------------------------

def test_requested_view_is_active():
    check_requested_view_is_active(_CHILD_ENV)


@pytest.mark.parametrize("view", LOWER_VIEWS)
def test_cpu_view(view):
    """Reruns the kernel tests of this module in a child that sees CPU view ``view``, so
    every compiled variant and oneDNN path of the CPUs below this one is checked here."""
    child_skip()
    rerun_module_in_view(__file__, view, _CHILD_ENV, "cpu_view", len(K_SIZES) * len(OUT_DTYPES))
