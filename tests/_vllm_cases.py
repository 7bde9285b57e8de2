"""What the vLLM engine and server tests expect, shared by tests/test_vllm.py and
tests/test_vllm_serve.py (the engine runner itself is flashcomm.tools.vllm_engine)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import pytest

from flashcomm.tools.vllm_engine import cpu_view_from_env

REFUSAL = "flashcomm: refusing to enable flashcomm for this vLLM model"
ACTIVE = "flashcomm: active"  # flashcomm.vllm.plugin.ACTIVE_MARKER
BF16_TIE_NATS = 0.05
CPU_VIEW = cpu_view_from_env()

# What flashcomm converts in the tiny checkpoints (make_tiny_checkpoint.py defaults), per
# weight kind and form of the converted layers (the worker reports the form as
# additional_config["flashcomm"]["gemm"]; none reported = "flashcomm"). "ops": groups of
# flashcomm ops; in every worker each group must have calls counted in both modes
# (replicated and sharded) while batches below and above SP_THRESHOLD run. "converted":
# modules with flashcomm state in the tiny model (TINY_LAYERS decoder layers).
TINY_LAYERS = 2
CONVERSION: dict[tuple[str, str], dict] = {
    # flashcomm computes: per layer 2 norms, qkv, o, gate_up, down; plus the final norm.
    ("fp", "flashcomm"): {"ops": (("sp_row_linear",), ("sp_column_linear",),
                                  ("sp_add_rms_norm",)),
                          "converted": 6 * TINY_LAYERS + 1},
    ("w8a8", "flashcomm"): {"ops": (("sp_row_linear_w8a8",), ("sp_column_linear_w8a8",),
                                    ("sp_add_rms_norm",)),
                            "converted": 6 * TINY_LAYERS + 1},
    # vLLM's GEMMs compute, flashcomm communicates: per layer 2 norms, o, down; final norm.
    ("fp", "engine"): {"ops": (("sp_reduce",), ("sp_add_rms_norm",)),
                       "converted": 4 * TINY_LAYERS + 1},
    ("w8a8", "engine"): {"ops": (("sp_reduce",), ("sp_add_rms_norm",)),
                         "converted": 4 * TINY_LAYERS + 1},
}
MODES = ("replicated", "sharded")


def _vllm_missing() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return (f"vLLM is not importable ({type(e).__name__}: {e}); install the extra: "
                f"make install-vllm")
    return None


_MISSING = _vllm_missing()
requires_vllm = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def _sum_mode(stats: dict, mode: str, ops: tuple[str, ...]) -> int:
    return sum(stats.get(op, {}).get(mode, 0) for op in ops)


def expected_conversion(kind: str, worker: dict) -> dict:
    """``CONVERSION`` for weight ``kind`` in the form ``worker`` (a worker_stats() result
    or a stats-file document) reports."""
    form = (worker.get("flashcomm_config") or {}).get("gemm", "flashcomm")
    return CONVERSION[(kind, form)]


def missing_modes(stats: dict, expected: dict) -> list[str]:
    """The (op group, mode) pairs of ``expected["ops"]`` with no call counted in
    ``stats`` (one worker's ``flashcomm.stats()``)."""
    return [f"{'/'.join(ops)} {mode}" for ops in expected["ops"] for mode in MODES
            if _sum_mode(stats, mode, ops) == 0]


@contextlib.contextmanager
def flashcomm_log(level: int = logging.WARNING) -> Iterator[list[logging.LogRecord]]:
    """The records (``level`` and up) of flashcomm's ``vllm.flashcomm`` logger while the
    block runs (vLLM's logging setup may keep them from the root logger, so pytest's
    caplog does not see them)."""
    from flashcomm.vllm import _compat

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append
    _compat.logger.addHandler(handler)
    try:
        yield records
    finally:
        _compat.logger.removeHandler(handler)
