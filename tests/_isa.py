"""Running a test module again in a child process forced to one CPU ISA
(ATEN_CPU_CAPABILITY), so every compiled variant of flashcomm's multi-ISA kernels is
checked on this machine: the kernel tables follow ATen's capability."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Optional

import pytest
import torch

ISAS = ["default", "avx2", "avx512"]


def machine_isas() -> list[str]:
    """The ISA variants this machine and torch can run (ATen's own detection)."""
    best = torch.backends.cpu.get_cpu_capability().lower()
    if best not in ISAS:  # another architecture: only the portable variant exists
        return ["default"]
    return ISAS[: ISAS.index(best) + 1]


def in_child(child_env: str) -> bool:
    return bool(os.environ.get(child_env))


def check_requested_isa_is_active(child_env: str) -> None:
    """In an ISA child: ATen runs the ISA the parent asked for (else: skip)."""
    requested = os.environ.get("ATEN_CPU_CAPABILITY")
    if not in_child(child_env) or not requested:
        pytest.skip("only in an ISA child process")
    assert torch.backends.cpu.get_cpu_capability().lower() == requested


def rerun_module_with_isa(module_file: str, isa: str, child_env: str, deselect: str,
                          min_passed: int, extra_env: Optional[dict[str, str]] = None,
                          timeout_s: int = 1800) -> None:
    """Reruns ``module_file``'s tests except ``deselect`` (a -k expression) in a child
    forced to ``isa``; asserts it passed more than ``min_passed`` tests (not a run that
    skipped everything). Skips an ISA this machine cannot run."""
    if isa not in machine_isas():
        pytest.skip(f"this CPU/torch runs only {machine_isas()}, not {isa}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, **(extra_env or {}), **{child_env: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", module_file,
         "-k", f"not ({deselect})"],
        env=env, capture_output=True, text=True, timeout=timeout_s)
    report = f"{isa} {extra_env or ''}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) > min_passed, report
