"""Loads the compiled operator library (libflashcomm_ops.so) into torch.ops.

The library is tied to the torch release it was compiled against (torch's C++ ABI
changes between releases). It records that release (csrc/build_info.cpp); :func:`load`
reads the record from the file and refuses a library built for another torch release
before handing it to ``dlopen``, where the mismatch would surface as an undefined symbol
or not at all.

Releases are compared by major.minor: the C++ ABI changes between 2.11 and 2.12, while the
patch releases of one line (2.11.0, 2.11.1) are bug-fix builds of one branch that keep
it, so refusing them would only force needless rebuilds. A patch difference is logged.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_LIB_NAME = "libflashcomm_ops.so"
# csrc/build_info.cpp's record, as it lies in the file (a NUL-terminated C string).
_BUILD_RECORD = re.compile(rb"FLASHCOMM_BUILT_FOR_TORCH=([0-9]+)\.([0-9]+)\.([0-9]+)\x00")


def library_path() -> Path:
    """Path of the compiled op library: ``$FLASHCOMM_LIB`` if set, else the package's copy."""
    override = os.environ.get("FLASHCOMM_LIB")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / _LIB_NAME


def built_for_torch(path: Optional[Path] = None) -> Optional[str]:
    """The torch release ("2.11.0") the library at ``path`` (default :func:`library_path`)
    was compiled against, read from the file without loading it; None for a build that
    predates the record."""
    data = Path(path or library_path()).read_bytes()
    found = _BUILD_RECORD.search(data)
    return None if found is None else ".".join(g.decode() for g in found.groups())


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+", 1)[0].split(".")[:2]
    return int(major), int(minor)


def check_torch_match(path: Path) -> None:
    """Raises ImportError, naming both torch releases and how to fix it, when the library
    at ``path`` was built for another torch release than the running one."""
    built = built_for_torch(path)
    running = torch.__version__
    if built is None:
        logger.warning("flashcomm: %s records no torch release (an older build); it is "
                       "loaded unchecked against torch %s", path, running)
        return
    if _release(built) != _release(running):
        raise ImportError(
            f"flashcomm: {path} was built against torch {built}, but this process runs "
            f"torch {running}. torch's C++ ABI differs between releases, so the library "
            f"cannot be loaded. Rebuild flashcomm against this torch (from its source: "
            f"`pip install --no-build-isolation --no-deps --force-reinstall .`, or "
            f"`make build` in a checkout), or run torch {'.'.join(built.split('.')[:2])}.x."
            + (" FLASHCOMM_LIB is set and names this library."
               if os.environ.get("FLASHCOMM_LIB") else ""))
    if built != running.split("+", 1)[0]:
        logger.info("flashcomm: %s was built against torch %s, running %s (same release "
                    "line)", path, built, running)


def load() -> None:
    """Registers the ``torch.ops.flashcomm`` ops (idempotent).

    Raises ImportError when the library is missing or was built for another torch release.
    """
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
    check_torch_match(path)
    torch.ops.load_library(str(path))
