"""The prepare step of linear weights: pack once, use in every flashcomm linear op.

:func:`prepare_linear` packs a CPU weight ``[N, K]`` (float32 / bfloat16 / float16,
or int8 for the W8A8 ops) into the layout of torch's own oneDNN GEMMs where that
measured faster on this CPU (bfloat16 on AMX / AVX512-BF16, int8 on AMX-INT8 /
VNNI, for weights large enough to amortise oneDNN's per-call set-up). The result
goes into the ops' ``weight`` argument unchanged: it reports the plain weight's
sizes ``[N, K]`` and dtype, so argument checks, Meta kernels and ``torch.compile``
treat it like the plain weight, and every chunk of a pipelined call reuses it.
W8A8 weight scales are not packed; pass them as before.

A packed weight is opaque: no ``data_ptr``, views, ``copy.deepcopy`` or
``torch.save``, and ``F.linear`` rejects it. Keep only the prepared tensor (the
packed weight *replaces* the plain one: holding both doubles the memory). On other
devices, or where packing does not pay, the weight comes back plain (contiguous).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _loader

_loader.load()

PACKABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def prepare_linear(weight: torch.Tensor, pack: Optional[bool] = None) -> torch.Tensor:
    """Prepares a linear weight for the flashcomm ops.

    Args:
        weight: ``[N, K]`` (nn.Linear layout), float32 / bfloat16 / float16, or int8
            (the W8A8 ops). Already packed weights are returned as they are.
        pack: ``None`` packs where it pays on this CPU (:func:`packs_by_default`),
            ``True`` packs (raises if this CPU cannot), ``False`` keeps it plain.

    Returns:
        The weight to pass as ``weight``: packed, or plain and contiguous. It
        reports sizes ``[N, K]`` and ``weight.dtype`` either way.
    """
    with torch.no_grad():
        return torch.ops.flashcomm.prepare_linear_weight(weight, pack)


def is_packed(weight: torch.Tensor) -> bool:
    """True if ``weight`` is packed (by :func:`prepare_linear` or torch's
    ``mkldnn::_reorder_linear_weight``)."""
    return bool(torch.ops.flashcomm.is_packed_weight(weight))


def packing_supported(dtype: torch.dtype) -> bool:
    """True if this CPU can pack weights of ``dtype`` (probed once per process: the
    packed product of a small weight must equal the exact one)."""
    return bool(torch.ops.flashcomm.weight_packing_supported(dtype))


def packs_by_default(dtype: torch.dtype, shape: tuple[int, int]) -> bool:
    """True if :func:`prepare_linear` with ``pack=None`` packs a CPU weight of
    ``dtype`` and ``shape = (N, K)`` on this CPU: supported, and measured to pay
    (bfloat16 from N*K = 32K, int8 from 512K, on CPUs with native instructions)."""
    n_out, k_in = shape
    return bool(torch.ops.flashcomm.weight_packed_by_default(dtype, n_out, k_in))


__all__ = ["PACKABLE_DTYPES", "is_packed", "packing_supported", "packs_by_default",
           "prepare_linear"]
