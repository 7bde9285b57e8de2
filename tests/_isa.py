"""Running a test module again in a child process that sees a lesser x86 CPU
(:mod:`flashcomm.tools.cpu_view`: ATen's capability, oneDNN's ISA cap, flashcomm's own
extension use and vLLM's probes, together), so the kernel, packing and W8A8 paths of
every CPU class below this machine's run here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import flashcomm
from flashcomm.tools.cpu_view import VIEWS, views_below_machine

# The views below this machine, lowest last ([] on a CPU with no vector ISA to cap).
LOWER_VIEWS = views_below_machine()
_VIEW_ENV = "FLASHCOMM_TEST_CPU_VIEW"


def in_child(child_env: str) -> bool:
    return bool(os.environ.get(child_env))


def check_requested_view_is_active(child_env: str) -> None:
    """In a view child: ATen, flashcomm, oneDNN and torch.cpu's probes all see the view
    the parent asked for (else: skip, in the parent)."""
    name = os.environ.get(_VIEW_ENV)
    if not in_child(child_env) or name is None:
        pytest.skip("only in a CPU-view child process")
    view = VIEWS[name]
    assert torch.backends.cpu.get_cpu_capability().lower() == view.aten
    features = flashcomm.cpu_features()
    assert features[0] == view.aten, features
    if view.onednn in ("AVX2", "AVX512_CORE", "SSE41"):  # no extension admitted
        assert features == [view.aten], f"{name}: flashcomm still uses {features[1:]}"
    if "AMX" not in view.onednn:
        assert not any(f.startswith("amx") for f in features), features
    assert os.environ.get("ONEDNN_MAX_CPU_ISA") == view.onednn
    for probe in view.hidden:
        if hasattr(torch.cpu, probe):
            assert getattr(torch.cpu, probe)() is False, probe


def rerun_module_in_view(module_file: str, view: str, child_env: str, deselect: str,
                         min_passed: int, timeout_s: int = 1800) -> str:
    """Reruns ``module_file``'s tests except ``deselect`` (a -k expression) in a child
    that sees CPU view ``view``; asserts it passed more than ``min_passed`` tests (not a
    run that skipped everything) and returns its output."""
    with tempfile.TemporaryDirectory(prefix="fc_view_") as tmp:
        from flashcomm.tools.cpu_view import view_env
        env = view_env(Path(tmp), view)
        env.update({child_env: "1", _VIEW_ENV: view})
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-p", "no:cacheprovider",
             module_file, "-k", f"not ({deselect})"],
            env=env, capture_output=True, text=True, timeout=timeout_s)
    report = f"view {view!r} ({VIEWS[view].like}):\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) > min_passed, report
    return proc.stdout
