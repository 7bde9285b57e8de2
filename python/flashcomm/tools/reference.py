"""Pure-torch, single-process references of the flashcomm ops and the W8A8
quantisation rules. Used by the tests, the demo and the benchmarks; they are
the specification the C++ kernels are checked against.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def shard_rows(n: int, tp: int) -> int:
    """Rows per rank block of the compact layout: ``ceil(n / tp)``."""
    return -(-n // tp)


def pad_to_blocks(x: torch.Tensor, tp: int, fill: float = 0.0) -> torch.Tensor:
    """``[n, ...]`` -> ``[tp * ceil(n / tp), ...]`` with ``fill`` in the padding rows."""
    n = x.shape[0]
    padded = x.new_full((tp * shard_rows(n, tp), *x.shape[1:]), fill)
    padded[:n] = x
    return padded


def token_shard(x: torch.Tensor, tp: int, rank: int, fill: float = 0.0) -> torch.Tensor:
    """Rank ``rank``'s compact shard ``[ceil(n / tp), ...]`` of the full ``x [n, ...]``."""
    c = shard_rows(x.shape[0], tp)
    return pad_to_blocks(x, tp, fill)[rank * c:(rank + 1) * c].contiguous()


def feature_slice(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    """Rank ``rank``'s equal slice of ``t`` along ``dim`` (tensor-parallel weights)."""
    size = t.shape[dim]
    assert size % tp == 0, f"dim {dim} of size {size} is not divisible by tp={tp}"
    return t.narrow(dim, rank * (size // tp), size // tp).contiguous()


# --- W8A8 quantisation rules (mirrors csrc/ops/quant.h) -----------------------

def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weight: ``w [N, K] ~= q * scale[:, None]``.

    Returns ``(q int8 [N, K], scale float32 [N])``.
    """
    wf = w.float()
    scale = wf.abs().amax(dim=1) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(wf / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor,
                    zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Static per-tensor quantisation: ``clamp(round(x / s) + zp, -128, 127)``."""
    v = torch.round(x.float() / scale.reshape(1).float())
    if zero_point is not None:
        v = v + zero_point.reshape(1).float()
    return torch.clamp(torch.nan_to_num(v, 0.0, 127.0, -128.0), -128, 127).to(torch.int8)


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric quantisation: ``s_t = max|x_t| / 127``.

    Returns ``(q int8 [m, K], scale float32 [m, 1])``; an all-zero row has scale 0.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(xf / safe), -127, 127).to(torch.int8)
    return q, scale


def int8_gemm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``q [m, K] int8 @ w [N, K]^T int8`` as int64 (float64 sums of int8
    products are exact far beyond int32)."""
    return (q.double() @ w.double().t()).to(torch.int64)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                input_scale: Optional[torch.Tensor] = None,
                input_zero_point: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense W8A8 linear in float32: quantise ``x`` (or take int8 ``x`` with
    ``input_scale``), integer GEMM, dequantise, add bias. Returns ``[m, N]`` fp32."""
    if x.dtype == torch.int8:
        q, s = x, input_scale.float()
        s = s if s.dim() == 2 else s.reshape(1, 1)
    elif input_scale is not None:
        q, s = quantize_static(x, input_scale, input_zero_point), input_scale.reshape(1, 1).float()
    else:
        q, s = quantize_dynamic(x)
    acc = int8_gemm(q, w_q).double()
    if input_zero_point is not None:
        acc = acc - input_zero_point.double().reshape(1) * w_q.double().sum(dim=1)
    y = acc * s.double() * w_scale.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return y.float()


# --- The ops, densely -----------------------------------------------------------

def gemm_rs_reference(x_full: torch.Tensor, w_full: torch.Tensor, bias: Optional[torch.Tensor],
                      tp: int) -> torch.Tensor:
    """Global ``[n, N]`` result of gemm_rs over tp ranks (float64 accumulation).

    ``x_full [n, K]`` and ``w_full [N, K]``; rank r holds K-slice r of both."""
    y = x_full.double() @ w_full.double().t()
    if bias is not None:
        y = y + bias.double()
    return y


def gemm_rs_w8a8_reference(x_full: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                           input_scale: Optional[torch.Tensor],
                           input_zero_point: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], tp: int,
                           x_scale_full: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Global ``[n, N]`` fp32 result of gemm_rs_w8a8: every rank quantises its own
    K-slice (dynamic scales are per rank), the dequantised partials are summed.
    For int8 ``x_full``, ``x_scale_full`` is the input_scale every rank passes."""
    total = None
    for r in range(tp):
        xr = feature_slice(x_full, tp, r, dim=1)
        wr = feature_slice(w_q, tp, r, dim=1)
        scale = x_scale_full if x_full.dtype == torch.int8 else input_scale
        part = w8a8_linear(xr, wr, w_scale, scale, input_zero_point).double()
        total = part if total is None else total + part
    if bias is not None:
        total = total + bias.double()
    return total


def blocks_to_rows(blocks: list[torch.Tensor], n: int) -> torch.Tensor:
    """Concatenates the per-rank ``[c, N]`` outputs of gemm_rs and drops padding."""
    return torch.cat(blocks, dim=0)[:n]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want| / max(max|want|, tiny)`` in float64 (NaN-aware: NaN -> inf)."""
    if got.numel() == 0:
        return 0.0
    diff = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-12)
    return math.inf if math.isnan(diff) else diff / scale
