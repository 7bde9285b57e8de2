"""Loads the compiled operator library (libflashcomm_ops.so) into torch.ops."""

from __future__ import annotations

import os
from pathlib import Path

import torch

_LIB_NAME = "libflashcomm_ops.so"


def library_path() -> Path:
    """Path of the compiled op library: ``$FLASHCOMM_LIB`` if set, else the package's copy."""
    override = os.environ.get("FLASHCOMM_LIB")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / _LIB_NAME


def load() -> None:
    """Registers the ``torch.ops.flashcomm`` ops (idempotent)."""
    if hasattr(torch.ops, "flashcomm") and hasattr(torch.ops.flashcomm, "gemm_rs"):
        return
    path = library_path()
    if not path.exists():
        raise ImportError(
            f"flashcomm: compiled op library not found at {path}. Build it with "
            "`make build` (or `pip install --no-build-isolation -e .`), or point "
            "FLASHCOMM_LIB at a libflashcomm_ops.so built against this torch "
            f"({torch.__version__})."
        )
    torch.ops.load_library(str(path))
