"""flashcomm LinearMethods for vLLM models written for sequence parallelism.

For users who write their own sequence-parallel (SP) vLLM models. The layout-invariant
plugin (:mod:`flashcomm.vllm.plugin`) is what runs unmodified vLLM models; this module
is the lower-level API: it swaps the quant method of vLLM's parallel linear layers for
one whose ``apply`` calls flashcomm's **compact** ops:

* ``RowParallelLinear``: ``gemm_rs[_w8a8]``: ``x [n, K_r]`` -> this rank's token shard
  ``[c, N]`` (``c = ceil(n / tp)``) of the reduced output; the layer's own all-reduce is
  turned off (``reduce_results=False``) because the op already reduces.
* ``ColumnParallelLinear`` (and Merged / QKV): ``ag_gemm[_w8a8]``: this rank's token
  shard ``[c, K]`` -> ``[num_tokens, N_r]`` for all tokens.

When it is correct (all must hold; :func:`enable_flashcomm_on_model` checks what it can):

1. The model is written for SP: everything between a row layer and the next column
   layer (residual add, RMSNorm, ...) works on the token shard ``[c, H]`` that the row
   layer returns, rank r holding tokens ``[r*c, r*c + c)`` (rows at or past n are zero);
   the column layer's input is that shard. A plain-TP model (vLLM's own models) is NOT
   correct with these methods: use the plugin (layout-invariant ops) instead.
2. ``num_tokens`` of each column layer is known: by default ``c * tp`` (the model pads
   its token count to a multiple of tp, as vLLM's own SP pass does), otherwise pass
   ``num_tokens_fn(x) -> int | SymInt`` returning the true global token count.
3. Row layers to convert have ``reduce_results=True`` (others, e.g. MoE shared experts,
   are left alone), column layers ``gather_output=False``; every layer uses the group
   ``group`` (default: vLLM's TP group), i.e. not ``disable_tp``.
4. It is called after the model is built and **before** vLLM's
   ``process_weights_after_loading`` (on CPU that step empties ``layer.weight``; int8
   kernels transpose / drop it). The methods keep the weights in flashcomm's layout.
5. Quantization: unquantized, or compressed-tensors W8A8 int8
   (``CompressedTensorsW8A8Int8``: per-channel / per-tensor weight scales, dynamic
   symmetric per-token or static per-tensor activations). Anything else raises.

``threshold``: the pipelined strategy runs iff ``enabled`` and ``n > threshold``
(``< 0``: auto); ``enabled=False`` keeps the compact layout with the sequential
strategy (GEMM, then one collective).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

import flashcomm  # noqa: F401  (loads the op library)

from . import _compat
from .layers import (ColumnParallelLinear, RowParallelLinear, capture_fp, capture_w8a8,
                     classify_quant_method)

LinearMethodBase = _compat.symbol("LinearMethodBase")

NumTokensFn = Callable[[torch.Tensor], Union[int, torch.SymInt]]


class _FlashcommMethodBase(LinearMethodBase):
    """Delegates weight creation to the original method; keeps the weights in
    flashcomm's layout after loading; ``apply`` calls a compact op."""

    kind = "fp"

    def __init__(self, inner: Any, role: str, group_name: str, threshold: int,
                 enabled: bool, num_tokens_fn: Optional[NumTokensFn], tp: int) -> None:
        super().__init__()
        if role not in ("row", "column"):
            raise ValueError(f"role must be 'row' or 'column', got {role!r}")
        self.inner, self.role, self.group_name = inner, role, group_name
        self.threshold, self.enabled = int(threshold), bool(enabled)
        self.num_tokens_fn, self.tp = num_tokens_fn, tp

    def create_weights(self, layer, *args, **kwargs):
        return self.inner.create_weights(layer, *args, **kwargs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        (capture_fp if self.kind == "fp" else capture_w8a8)(layer)

    def _num_tokens(self, x: torch.Tensor):
        return self.num_tokens_fn(x) if self.num_tokens_fn else x.shape[0] * self.tp


class FlashcommLinearMethod(_FlashcommMethodBase):
    """Unquantized: ``gemm_rs`` (row) / ``ag_gemm`` (column)."""

    kind = "fp"

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.role == "row":
            return torch.ops.flashcomm.gemm_rs(x, layer.fc_weight, bias, self.group_name,
                                               self.threshold, self.enabled)
        return torch.ops.flashcomm.ag_gemm(x, layer.fc_weight, bias, self.group_name,
                                           self._num_tokens(x), self.threshold, self.enabled,
                                           False)


class FlashcommW8A8LinearMethod(_FlashcommMethodBase):
    """Compressed-tensors W8A8 int8: ``gemm_rs_w8a8`` / ``ag_gemm_w8a8``; the output
    dtype is x's."""

    kind = "w8a8"

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        args = (layer.fc_weight, layer.fc_weight_scale, layer.fc_input_scale,
                layer.fc_input_zero_point, bias, self.group_name)
        if self.role == "row":
            return torch.ops.flashcomm.gemm_rs_w8a8(x, *args, x.dtype, self.threshold,
                                                    self.enabled)
        return torch.ops.flashcomm.ag_gemm_w8a8(x, *args, self._num_tokens(x), x.dtype,
                                                self.threshold, self.enabled, False)


def enable_flashcomm_on_model(model: nn.Module, threshold: int = flashcomm.DEFAULT_THRESHOLD,
                              enabled: bool = True, group: Any = None,
                              num_tokens_fn: Optional[NumTokensFn] = None) -> int:
    """Install flashcomm's compact-op LinearMethods on ``model``'s parallel linear layers
    (see the module docstring for when this is correct). ``group``: a ProcessGroup or
    c10d name; default vLLM's TP group. Returns the number of layers converted.
    Raises ``ValueError`` (converting nothing) if a layer cannot be converted."""
    if group is None:
        g = _compat.symbol("get_tp_group")()
        group_name, tp = g.device_group.group_name, g.world_size
    else:
        group_name = flashcomm.group_name(group)
        tp = _compat.symbol("_resolve_process_group")(group_name).size()
    plan = []
    for name, mod in model.named_modules():
        if isinstance(mod, RowParallelLinear):
            if not mod.reduce_results:
                continue  # the model reduces elsewhere on purpose (e.g. shared experts)
            role = "row"
        elif isinstance(mod, ColumnParallelLinear):
            if mod.gather_output:
                raise ValueError(f"flashcomm: {name} has gather_output=True; not supported")
            role = "column"
        else:
            continue
        if isinstance(mod.quant_method, _FlashcommMethodBase):
            continue  # already converted
        if mod.tp_size != tp:
            raise ValueError(f"flashcomm: {name} has tp_size={mod.tp_size} but the group has "
                             f"{tp} ranks (disable_tp layers are not supported)")
        kind = classify_quant_method(mod)
        if kind is None:
            raise ValueError(f"flashcomm: {name}: quant method "
                             f"{type(mod.quant_method).__name__} is not supported")
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 2 or w.numel() == 0:
            raise ValueError(f"flashcomm: {name}.weight is gone (vLLM's "
                             "process_weights_after_loading already ran); call "
                             "enable_flashcomm_on_model before the weights are processed")
        plan.append((mod, role, kind))
    for mod, role, kind in plan:
        cls = FlashcommLinearMethod if kind == "fp" else FlashcommW8A8LinearMethod
        mod.quant_method = cls(mod.quant_method, role, group_name, threshold, enabled,
                               num_tokens_fn, tp)
        if role == "row":
            mod.flashcomm_reduce_results = mod.reduce_results  # the original setting
            mod.reduce_results = False  # gemm_rs reduces (scatters) already
    return len(plan)
