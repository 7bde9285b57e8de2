"""Packaging: `pip install .` (not editable) builds a wheel that imports and runs in a
clean virtual environment, and the build prints no deprecation warning. (The C++
package -- `cmake --install` + find_package(flashcomm) -- is ctest's consumer_project.)"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

SMOKE = r"""
import os, torch, torch.distributed as dist
import flashcomm
assert "site-packages" in flashcomm.__file__, flashcomm.__file__
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % int(os.environ["PORT"]),
                        rank=0, world_size=1)
x, w = torch.randn(9, 16), torch.randn(8, 16)
out = flashcomm.sp_row_linear(x, w, None, None, 4)
assert torch.allclose(out, x @ w.t(), atol=1e-5)
print("wheel ok", flashcomm.__version__, flashcomm.transport(None) or "-")
"""


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def test_wheel_builds_without_warnings_and_runs_in_a_clean_venv(tmp_path):
    from flashcomm.tools.testing import free_port
    env = dict(os.environ, FLASHCOMM_BUILD_DIR=str(tmp_path / "build"))
    env.pop("FLASHCOMM_LIB", None)
    # Against the installed torch (no isolated build env fetching another one).
    log = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                "-v", "-w", str(tmp_path / "dist"), str(ROOT)], env=env, timeout=1800)
    warnings = [line for line in log.splitlines()
                if "deprecat" in line.lower()]
    assert not warnings, "\n".join(warnings)
    wheels = list((tmp_path / "dist").glob("flashcomm-*.whl"))
    assert len(wheels) == 1, wheels

    venv.create(tmp_path / "venv", with_pip=True)
    py = str(tmp_path / "venv" / "bin" / "python")
    _run([py, "-m", "pip", "install", "--quiet", "torch==2.13.0"], timeout=900)
    _run([py, "-m", "pip", "install", "--quiet", "--no-deps", str(wheels[0])], timeout=600)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "FLASHCOMM_LIB", "VIRTUAL_ENV")}
    clean["PORT"] = str(free_port())
    out = _run([py, "-c", SMOKE], env=clean, cwd=str(tmp_path), timeout=600)
    assert "wheel ok" in out, out
