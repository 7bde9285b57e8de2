"""Bad input raises a clear error naming the argument and the expectation, on
every rank, before any collective (so nothing hangs), eagerly and while
tracing with fake tensors. Strided inputs are accepted and computed correctly."""

from __future__ import annotations

import functools
import re

import pytest
import torch

import flashcomm
from flashcomm.tools.reference import feature_slice, relative_error, token_shard

from _cases import rank_and_size

K, N = 16, 8
TP = 2

f32, bf16, i8, i32 = torch.float32, torch.bfloat16, torch.int8, torch.int32


def _t(*shape, dtype=f32, device="cpu"):
    if dtype in (i8, i32):
        return torch.randint(-5, 5, shape, dtype=dtype, device=device)
    return torch.randn(*shape, device=device).to(dtype)


def _g():
    return flashcomm.group_name(None)


ONE = lambda: torch.tensor([0.1])  # noqa: E731  per-tensor scale
ZP = lambda: torch.tensor([2], dtype=i32)  # noqa: E731


def _gemm_rs(x, w, b=None, group=None):
    return lambda: torch.ops.flashcomm.gemm_rs(x, w, b, group or _g())


def _ag_gemm(x, w, n, b=None):
    return lambda: torch.ops.flashcomm.ag_gemm(x, w, b, _g(), n)


def _rs_w8a8(x, w, ws, s=None, zp=None, b=None, out=bf16):
    return lambda: torch.ops.flashcomm.gemm_rs_w8a8(x, w, ws, s, zp, b, _g(), out)


def _ag_w8a8(x, w, ws, n, s=None, zp=None, b=None, out=bf16):
    return lambda: torch.ops.flashcomm.ag_gemm_w8a8(x, w, ws, s, zp, b, _g(), n, out)


def _sp_row(x, w, b=None):
    return lambda: torch.ops.flashcomm.sp_row_linear(x, w, b, _g())


def _sp_col(x, w, b=None, group=None):
    return lambda: torch.ops.flashcomm.sp_column_linear(x, w, b, group or _g())


def _sp_row_w8a8(x, w, ws, s=None, zp=None, out=bf16):
    return lambda: torch.ops.flashcomm.sp_row_linear_w8a8(x, w, ws, s, zp, None, _g(), out)


def _sp_col_w8a8(x, w, ws, s=None, zp=None, out=bf16):
    return lambda: torch.ops.flashcomm.sp_column_linear_w8a8(x, w, ws, s, zp, None, _g(), out)


def _sp_norm(x, r, w, group=None):
    return lambda: torch.ops.flashcomm.sp_add_rms_norm(x, r, w, 1e-6, group or _g())


def _sp_norm_(x, r, w, group=None):
    return lambda: torch.ops.flashcomm.sp_add_rms_norm_(x, r, w, 1e-6, group or _g())


def _sp_reduce(p, group=None, inplace=False):
    op = torch.ops.flashcomm.sp_reduce_ if inplace else torch.ops.flashcomm.sp_reduce
    return lambda: op(p, group or _g())


def _sp_gather(x, inplace=False):
    op = torch.ops.flashcomm.sp_gather_ if inplace else torch.ops.flashcomm.sp_gather
    return lambda: op(x, _g())


def _shared_rows():
    t = _t(8, K)
    return t[:4], t[:4]


# (case id, call builder, expected message regex). Built on the rank, by id.
CASES = {
    "gemm_rs/x-1d": (lambda: _gemm_rs(_t(K), _t(N, K)), r"gemm_rs: x must be 2-D \[n, K_r\]"),
    "gemm_rs/w-3d": (lambda: _gemm_rs(_t(4, K), _t(2, N, K)), r"gemm_rs: weight must be 2-D"),
    "gemm_rs/k-mismatch": (lambda: _gemm_rs(_t(4, K), _t(N, K + 1)),
                           r"gemm_rs: K mismatch: x has K = 16 .* has K = 17"),
    "gemm_rs/bias-len": (lambda: _gemm_rs(_t(4, K), _t(N, K), _t(N + 1)),
                         r"gemm_rs: bias must have N = weight.size\(0\) = 8 elements, got 9"),
    "gemm_rs/bias-2d": (lambda: _gemm_rs(_t(4, K), _t(N, K), _t(1, N)),
                        r"gemm_rs: bias must be 1-D \[N\]"),
    "gemm_rs/bias-dtype": (lambda: _gemm_rs(_t(4, K), _t(N, K), _t(N, dtype=bf16)),
                           r"gemm_rs: bias dtype must match x"),
    "gemm_rs/w-dtype": (lambda: _gemm_rs(_t(4, K), _t(N, K, dtype=bf16)),
                        r"gemm_rs: weight dtype must match x \(Float\), got BFloat16"),
    "gemm_rs/w-int8": (lambda: _gemm_rs(_t(4, K), _t(N, K, dtype=i8)),
                       r"gemm_rs: weight dtype must match x .*use the _w8a8 op"),
    "gemm_rs/x-int": (lambda: _gemm_rs(_t(4, K, dtype=i32), _t(N, K, dtype=i32)),
                      r"gemm_rs: x must be floating point"),
    "gemm_rs/device": (lambda: _gemm_rs(_t(4, K), _t(N, K, device="meta")),
                       r"gemm_rs: weight must be on x's device cpu, got meta"),
    "gemm_rs/group": (lambda: _gemm_rs(_t(4, K), _t(N, K), group="no-such-group"),
                      r"gemm_rs: unknown group_name 'no-such-group'"),
    "ag_gemm/num-tokens": (lambda: _ag_gemm(_t(3, K), _t(N, K), 10),
                           r"ag_gemm: x has 3 rows but num_tokens = 10 over tp = 2 ranks needs "
                           r"ceil\(num_tokens / tp\) = 5"),
    "ag_gemm/negative-n": (lambda: _ag_gemm(_t(0, K), _t(N, K), -2),
                           r"ag_gemm: num_tokens must be >= 0, got -2"),
    "ag_gemm/k-mismatch": (lambda: _ag_gemm(_t(3, K), _t(N, K - 1), 6), r"ag_gemm: K mismatch"),
    "ag_gemm/bias-len": (lambda: _ag_gemm(_t(3, K), _t(N, K), 6, _t(3)),
                         r"ag_gemm: bias must have N"),
    "ag_gemm/x-3d": (lambda: _ag_gemm(_t(3, 1, K), _t(N, K), 6), r"ag_gemm: x must be 2-D"),
    "gemm_rs_w8a8/w-float": (lambda: _rs_w8a8(_t(4, K), _t(N, K), _t(N)),
                             r"gemm_rs_w8a8: weight must be int8, got Float"),
    "gemm_rs_w8a8/x-int8-no-scale": (lambda: _rs_w8a8(_t(4, K, dtype=i8), _t(N, K, dtype=i8),
                                                      _t(N)),
                                     r"gemm_rs_w8a8: x is int8 .* input_scale is required"),
    "gemm_rs_w8a8/w-scale-shape": (lambda: _rs_w8a8(_t(4, K), _t(N, K, dtype=i8), _t(N + 1)),
                                   r"gemm_rs_w8a8: weight_scale must be per-channel \[N\] or "
                                   r"\[N, 1\] with N = 8, or per-tensor \[1\]; got sizes \[9\]"),
    "gemm_rs_w8a8/w-scale-dtype": (lambda: _rs_w8a8(_t(4, K), _t(N, K, dtype=i8),
                                                    _t(N, dtype=bf16)),
                                   r"gemm_rs_w8a8: weight_scale must be float32"),
    "gemm_rs_w8a8/zp-no-scale": (lambda: _rs_w8a8(_t(4, K), _t(N, K, dtype=i8), _t(N), None,
                                                  ZP()),
                                 r"gemm_rs_w8a8: input_zero_point given without input_scale"),
    "gemm_rs_w8a8/zp-dtype": (lambda: _rs_w8a8(_t(4, K), _t(N, K, dtype=i8), _t(N), ONE(),
                                               torch.tensor([2.0])),
                              r"gemm_rs_w8a8: input_zero_point must be int32"),
    "gemm_rs_w8a8/in-scale-shape": (lambda: _rs_w8a8(_t(4, K), _t(N, K, dtype=i8), _t(N),
                                                     _t(4, 1)),
                                    r"gemm_rs_w8a8: input_scale must be per-tensor \[1\] for "
                                    r"floating-point x"),
    "gemm_rs_w8a8/out-dtype": (lambda: _rs_w8a8(_t(4, K), _t(N, K, dtype=i8), _t(N), out=i32),
                               r"gemm_rs_w8a8: out_dtype must be float32, float16 or bfloat16"),
    "gemm_rs_w8a8/k-bound": (lambda: _rs_w8a8(_t(1, 131072), _t(1, 131072, dtype=i8), _t(1)),
                             r"gemm_rs_w8a8: K = 131072 exceeds 131071"),
    "gemm_rs_w8a8/bias-int": (lambda: _rs_w8a8(_t(4, K), _t(N, K, dtype=i8), _t(N),
                                               b=_t(N, dtype=i32)),
                              r"gemm_rs_w8a8: bias must be floating point"),
    "ag_gemm_w8a8/per-token-rows": (lambda: _ag_w8a8(_t(3, K, dtype=i8), _t(N, K, dtype=i8),
                                                     _t(N), 6, _t(4, 1)),
                                    r"ag_gemm_w8a8: input_scale must be per-tensor \[1\] or "
                                    r"per-token \[rows, 1\]"),
    "ag_gemm_w8a8/num-tokens": (lambda: _ag_w8a8(_t(3, K), _t(N, K, dtype=i8), _t(N), 3),
                                r"ag_gemm_w8a8: x has 3 rows but num_tokens = 3"),
    "ag_gemm_w8a8/w-float": (lambda: _ag_w8a8(_t(3, K), _t(N, K), _t(N), 6),
                             r"ag_gemm_w8a8: weight must be int8"),
    "ag_gemm/requires-grad": (lambda: _ag_gemm(_t(3, K).requires_grad_(), _t(N, K), 6),
                              r"ag_gemm: argument 'x' requires grad, but flashcomm ops are "
                              r"inference-only"),
    "sp_row_linear/x-1d": (lambda: _sp_row(_t(K), _t(N, K)),
                           r"sp_row_linear: x must be 2-D \[n, K_r\]"),
    "sp_row_linear/k-mismatch": (lambda: _sp_row(_t(4, K), _t(N, K + 2)),
                                 r"sp_row_linear: K mismatch: x has K = 16"),
    "sp_row_linear/bias-len": (lambda: _sp_row(_t(4, K), _t(N, K), _t(N - 1)),
                               r"sp_row_linear: bias must have N = weight.size\(0\) = 8"),
    "sp_row_linear/w-int8": (lambda: _sp_row(_t(4, K), _t(N, K, dtype=i8)),
                             r"sp_row_linear: weight dtype must match x .*use the _w8a8 op"),
    "sp_column_linear/w-dtype": (lambda: _sp_col(_t(4, K), _t(N, K, dtype=bf16)),
                                 r"sp_column_linear: weight dtype must match x"),
    "sp_column_linear/device": (lambda: _sp_col(_t(4, K), _t(N, K, device="meta")),
                                r"sp_column_linear: weight must be on x's device cpu, got meta"),
    "sp_column_linear/group": (lambda: _sp_col(_t(4, K), _t(N, K), group="nope"),
                               r"sp_column_linear: unknown group_name 'nope'"),
    "sp_row_linear_w8a8/w-float": (lambda: _sp_row_w8a8(_t(4, K), _t(N, K), _t(N)),
                                   r"sp_row_linear_w8a8: weight must be int8, got Float"),
    "sp_row_linear_w8a8/zp-no-scale": (lambda: _sp_row_w8a8(_t(4, K), _t(N, K, dtype=i8),
                                                            _t(N), None, ZP()),
                                       r"sp_row_linear_w8a8: input_zero_point given without"),
    "sp_column_linear_w8a8/x-int8-no-scale": (
        lambda: _sp_col_w8a8(_t(4, K, dtype=i8), _t(N, K, dtype=i8), _t(N)),
        r"sp_column_linear_w8a8: x is int8 .* input_scale is required"),
    "sp_column_linear_w8a8/out-dtype": (
        lambda: _sp_col_w8a8(_t(4, K), _t(N, K, dtype=i8), _t(N), out=i8),
        r"sp_column_linear_w8a8: out_dtype must be float32, float16 or bfloat16"),
    "sp_add_rms_norm/x-1d": (lambda: _sp_norm(_t(K), None, _t(K)),
                             r"sp_add_rms_norm: x must be 2-D \[n, H\]"),
    "sp_add_rms_norm/weight-len": (lambda: _sp_norm(_t(4, K), None, _t(K + 1)),
                                   r"sp_add_rms_norm: weight must have H = 16 elements, got 17"),
    "sp_add_rms_norm/residual-rows": (lambda: _sp_norm(_t(4, K), _t(5, K), _t(K)),
                                      r"sp_add_rms_norm: residual must have x's n = 4 rows, "
                                      r"got 5"),
    "sp_add_rms_norm/residual-dtype": (lambda: _sp_norm(_t(4, K), _t(4, K, dtype=bf16), _t(K)),
                                       r"sp_add_rms_norm: residual dtype must match x"),
    "sp_add_rms_norm/x-int": (lambda: _sp_norm(_t(4, K, dtype=i32), None, _t(K)),
                              r"sp_add_rms_norm: x must be floating point"),
    "set_all_reduce_provider/unknown-op": (
        lambda: functools.partial(flashcomm.set_all_reduce_provider, None, "nope::all_reduce",
                                  "tp:0"),
        r"set_all_reduce_provider: no op 'nope::all_reduce' is registered"),
    "set_all_reduce_provider/unqualified": (
        lambda: functools.partial(flashcomm.set_all_reduce_provider, None, "all_reduce", "tp:0"),
        r"set_all_reduce_provider: op must be a qualified op name like 'vllm::all_reduce'"),
    "set_all_reduce_provider/schema": (
        lambda: functools.partial(flashcomm.set_all_reduce_provider, None, "aten::relu", "tp:0"),
        r"set_all_reduce_provider: op 'aten::relu' must have the schema \(Tensor tensor, str "
        r"group_name\) -> Tensor, got aten::relu\(Tensor self\) -> Tensor"),
    "set_all_reduce_provider/group": (
        lambda: functools.partial(flashcomm.set_all_reduce_provider, "nope", "vllm::all_reduce",
                                  "tp:0"),
        r"set_all_reduce_provider: unknown group_name 'nope'"),
    "sp_add_rms_norm_/x-strided": (lambda: _sp_norm_(_t(K, 4).t(), _t(4, K), _t(K)),
                                   r"sp_add_rms_norm_: x and residual must be contiguous"),
    "sp_add_rms_norm_/shared": (lambda: _sp_norm_(*_shared_rows(), _t(K)),
                                r"sp_add_rms_norm_: x and residual must not share memory"),
    "sp_add_rms_norm_/residual-cols": (lambda: _sp_norm_(_t(4, K), _t(4, K + 1), _t(K)),
                                       r"sp_add_rms_norm_: residual must have x's H = 16"),
    "sp_reduce/1d": (lambda: _sp_reduce(_t(K)), r"sp_reduce: partial must be 2-D \[n, N\]"),
    "sp_reduce/int": (lambda: _sp_reduce(_t(4, K, dtype=i32)),
                      r"sp_reduce: partial must be floating point"),
    "sp_reduce_/strided": (lambda: _sp_reduce(_t(K, 4).t(), inplace=True),
                           r"sp_reduce_: partial must be contiguous"),
    "sp_gather/1d": (lambda: _sp_gather(_t(K)), r"sp_gather: x must be 2-D \[n, N\]"),
    "sp_gather_/strided": (lambda: _sp_gather(_t(K, 4).t(), inplace=True),
                           r"sp_gather_: x must be contiguous"),
    "sp_reduce/group": (lambda: _sp_reduce(_t(4, K), group="nope"),
                        r"sp_reduce: unknown group_name 'nope'"),
    "sp_add_rms_norm/requires-grad": (lambda: _sp_norm(_t(4, K).requires_grad_(), None, _t(K)),
                                      r"sp_add_rms_norm: argument 'x' requires grad"),
}

# Cases whose check lives in the Meta kernel too (shape/dtype rules): they must
# fail identically while torch.compile traces with fake tensors.
FAKE_CASES = ["gemm_rs/k-mismatch", "gemm_rs/bias-len", "ag_gemm/num-tokens",
              "gemm_rs_w8a8/w-scale-shape", "ag_gemm_w8a8/w-float", "gemm_rs/group",
              "sp_row_linear/k-mismatch", "sp_add_rms_norm/residual-rows",
              "sp_column_linear_w8a8/out-dtype", "sp_add_rms_norm_/residual-cols",
              "sp_reduce/int"]


def _error_on_rank(case_id: str, fake: bool) -> str:
    build, _ = CASES[case_id]
    call = build()
    try:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True):
                call()
        else:
            call()
    except RuntimeError as e:
        return str(e).split("\n")[0]
    return "<no error>"


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_bad_input_is_rejected_clearly(ranks, case_id):
    messages = ranks(TP).run(_error_on_rank, case_id, False, timeout_s=60)
    pattern = CASES[case_id][1]
    for msg in messages:
        assert re.search(pattern, msg), f"{case_id}: got {msg!r}, expected /{pattern}/"


@pytest.mark.parametrize("case_id", FAKE_CASES)
def test_bad_input_is_rejected_while_tracing(ranks, case_id):
    messages = ranks(TP).run(_error_on_rank, case_id, True, timeout_s=60)
    for msg in messages:
        assert re.search(CASES[case_id][1], msg), f"{case_id}: got {msg!r}"


def _strided_on_rank(x_full, w_full, n):
    """Transposed / sliced (non-contiguous) x and weight views."""
    rank, tp = rank_and_size()
    x_rs = feature_slice(x_full, tp, rank, dim=1).t().contiguous().t()  # column-major
    w_rs = feature_slice(w_full, tp, rank, dim=1)[:, :].t().contiguous().t()
    rs = flashcomm.gemm_rs(x_rs, w_rs, None, None, 0)
    shard = token_shard(x_full, tp, rank)
    x_ag = torch.stack([shard, -shard], dim=2).reshape(shard.shape[0], -1)[:, ::2]  # stride 2
    w_ag = feature_slice(w_full, tp, rank, dim=0).t().contiguous().t()
    ag = flashcomm.ag_gemm(x_ag, w_ag, None, None, n, 0)
    return rs, ag


def test_strided_inputs_are_accepted(ranks):
    n = 37
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, K, generator=g)
    w = torch.randn(N, K, generator=g)
    want = x.double() @ w.double().t()
    results = ranks(TP).run(_strided_on_rank, x, w, n)
    rs = torch.cat([r for r, _ in results])[:n]
    assert relative_error(rs, want) <= 1e-5
    ag = torch.cat([a for _, a in results], dim=1)
    assert relative_error(ag, want) <= 1e-5
