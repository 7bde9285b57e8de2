"""Layout-invariant sequence-parallel ops (drop-in for plain TP layers).

Hidden states keep the full shape ``[n, H]`` on every rank in both modes:

* ``replicated`` (``n <= sp_threshold``, tp == 1, or ``enabled=False``): every row
  is valid on every rank: exactly plain TP (GEMM + all-reduce).
* ``sharded``: rank r's owned rows ``[r*c, min(n, r*c + c))``, ``c = ceil(n / tp)``,
  are valid; the other rows are don't-care (NaN when ``FLASHCOMM_DEBUG_POISON=1``).

The mode is a pure function of ``(n, tp, sp_threshold, enabled)``: pass the same
``sp_threshold`` to every op of a model. No output shape depends on the mode, so
one compiled graph serves every n. ``threshold`` is the compact kernels' strategy
threshold used in sharded mode (``< 0``: auto).
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops import DEFAULT_SP_THRESHOLD, Group, group_name


def sp_mode(n: int, tp: int, sp_threshold: int = DEFAULT_SP_THRESHOLD,
            enabled: bool = True) -> str:
    """``"sharded"`` iff ``enabled and tp > 1 and n > sp_threshold``, else
    ``"replicated"``: the rule the ops apply (computed by the library)."""
    return str(torch.ops.flashcomm.sp_mode(n, tp, sp_threshold, enabled))


def owned_rows(n: int, tp: int, rank: int) -> tuple[int, int]:
    """Half-open range ``[r*c, min(n, r*c + c))``, ``c = ceil(n / tp)``, of the rows rank
    ``rank`` owns in sharded mode (computed by the library)."""
    begin, end = torch.ops.flashcomm.owned_rows(n, tp, rank)
    return int(begin), int(end)


def sp_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  group: Group = None, sp_threshold: int = DEFAULT_SP_THRESHOLD,
                  enabled: bool = True, threshold: int = -1) -> torch.Tensor:
    """Row-parallel linear. ``x [n, K_r]`` (all rows valid), ``weight [N, K_r]``,
    ``bias [N]`` (added once per row; rank 0 only is enough). Returns ``[n, N]``:
    replicated = GEMM + all-reduce; sharded = GEMM + reduce-scatter into the owned rows."""
    return torch.ops.flashcomm.sp_row_linear(x, weight, bias, group_name(group), sp_threshold,
                                             enabled, threshold)


def sp_row_linear_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       input_scale: Optional[torch.Tensor] = None,
                       input_zero_point: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None, group: Group = None,
                       out_dtype: torch.dtype = torch.bfloat16,
                       sp_threshold: int = DEFAULT_SP_THRESHOLD, enabled: bool = True,
                       threshold: int = -1) -> torch.Tensor:
    """W8A8 :func:`sp_row_linear` (quantisation as in :func:`flashcomm.gemm_rs_w8a8`).
    Returns ``[n, N]`` in ``out_dtype``."""
    return torch.ops.flashcomm.sp_row_linear_w8a8(
        x, weight, weight_scale, input_scale, input_zero_point, bias, group_name(group),
        out_dtype, sp_threshold, enabled, threshold)


def sp_column_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     group: Group = None, sp_threshold: int = DEFAULT_SP_THRESHOLD,
                     enabled: bool = True, threshold: int = -1,
                     gather_output: bool = False) -> torch.Tensor:
    """Column-parallel linear. ``x [n, K]`` (sharded mode: owned rows valid),
    ``weight [N_r, K]``, ``bias [N_r]``. Returns ``[n, N_r]`` with every row valid
    (``[n, N_r * tp]`` with ``gather_output``)."""
    return torch.ops.flashcomm.sp_column_linear(x, weight, bias, group_name(group), sp_threshold,
                                                enabled, threshold, gather_output)


def sp_column_linear_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          input_scale: Optional[torch.Tensor] = None,
                          input_zero_point: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None, group: Group = None,
                          out_dtype: torch.dtype = torch.bfloat16,
                          sp_threshold: int = DEFAULT_SP_THRESHOLD, enabled: bool = True,
                          threshold: int = -1, gather_output: bool = False) -> torch.Tensor:
    """W8A8 :func:`sp_column_linear`; sharded mode quantises the owned rows and
    all-gathers int8 values plus scales. Returns ``[n, N_r]`` in ``out_dtype``."""
    return torch.ops.flashcomm.sp_column_linear_w8a8(
        x, weight, weight_scale, input_scale, input_zero_point, bias, group_name(group),
        out_dtype, sp_threshold, enabled, threshold, gather_output)


def sp_add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                    eps: float, group: Group = None, sp_threshold: int = DEFAULT_SP_THRESHOLD,
                    enabled: bool = True, gather: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary add + RMSNorm in vLLM's fused convention: ``s = x + residual``
    (fp32), returns ``(rmsnorm(s) * weight, s)``, both ``[n, H]`` in x's dtype
    (without residual, ``s = x``). Sharded mode computes only the owned rows;
    ``gather=True`` (the final norm) makes every row of the normed output valid."""
    return torch.ops.flashcomm.sp_add_rms_norm(x, residual, weight, eps, group_name(group),
                                               sp_threshold, enabled, gather)


def sp_reduce(partial: torch.Tensor, group: Group = None,
              sp_threshold: int = DEFAULT_SP_THRESHOLD, enabled: bool = True) -> torch.Tensor:
    """Row-parallel communication after an engine's own GEMM. ``partial [n, N]``:
    this rank's partial product for every row (bias on one rank only). Returns
    ``[n, N]``: replicated = all-reduce (every row valid); sharded = reduce-scatter
    into the owned rows (the rest don't-care)."""
    return torch.ops.flashcomm.sp_reduce(partial, group_name(group), sp_threshold, enabled)


def sp_gather(x: torch.Tensor, group: Group = None, sp_threshold: int = DEFAULT_SP_THRESHOLD,
              enabled: bool = True) -> torch.Tensor:
    """``x [n, H]`` (sharded mode: the owned rows valid) -> ``[n, H]`` with every row
    valid on every rank: all-gather of the owned rows (sharded) or a copy (replicated)."""
    return torch.ops.flashcomm.sp_gather(x, group_name(group), sp_threshold, enabled)


def sp_gather_(x: torch.Tensor, group: Group = None, sp_threshold: int = DEFAULT_SP_THRESHOLD,
               enabled: bool = True) -> None:
    """In-place :func:`sp_gather`: ``x [n, H]`` (contiguous; sharded mode: the owned rows
    valid) gets every rank's owned rows, so every row is valid. No allocation."""
    torch.ops.flashcomm.sp_gather_(x, group_name(group), sp_threshold, enabled)


def sp_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float, group: Group = None, sp_threshold: int = DEFAULT_SP_THRESHOLD,
                     enabled: bool = True, gather: bool = False) -> None:
    """In-place :func:`sp_add_rms_norm` for callers whose inputs are dead afterwards
    (vLLM's fused add + RMSNorm works this way): normed is written into ``x``, the new
    residual into ``residual`` (both ``[n, H]``, contiguous, distinct). No allocation;
    under ``torch.compile`` Inductor keeps it in place."""
    torch.ops.flashcomm.sp_add_rms_norm_(x, residual, weight, eps, group_name(group),
                                         sp_threshold, enabled, gather)


def sp_reduce_(partial: torch.Tensor, group: Group = None,
               sp_threshold: int = DEFAULT_SP_THRESHOLD, enabled: bool = True) -> None:
    """In-place :func:`sp_reduce`: ``partial [n, N]`` (contiguous) is all-reduced
    (replicated) or reduce-scattered into its owned rows (sharded)."""
    torch.ops.flashcomm.sp_reduce_(partial, group_name(group), sp_threshold, enabled)
