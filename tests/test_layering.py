"""The package's layers, checked in fresh interpreters: importing the library
(``flashcomm``, ``flashcomm.vllm``) loads none of the tools (nor vLLM), and the command
line (``flashcomm_cli``, the ``flashcomm`` console script) needs neither torch nor
flashcomm to list its commands or to hand ``serve`` over to vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "python" / "flashcomm_cli.py"

# Runs cli.py as a module of its own (not as part of the flashcomm package, whose
# __init__ loads the op library) with the given arguments, then prints which torch and
# flashcomm modules the process holds.
CLI_ALONE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("flashcomm_cli_alone", sys.argv[1])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
try:
    code = cli.main(sys.argv[2:])
except SystemExit as e:
    code = e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "flashcomm", "vllm"))
print("\nLOADED " + json.dumps({"code": code, "modules": loaded}))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]), **extra}


def _cli_alone(*args: str, **env: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", CLI_ALONE, str(CLI), *args],
                          capture_output=True, text=True, timeout=300, env=_env(**env))
    marker = [line for line in proc.stdout.splitlines() if line.startswith("LOADED ")]
    assert proc.returncode == 0 and marker, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(marker[-1][len("LOADED "):]), proc.stdout


def test_library_import_loads_no_tools():
    code = ("import sys, flashcomm, flashcomm.vllm, flashcomm.vllm.plugin, flashcomm.tuning\n"
            "print(sorted(m for m in sys.modules if m.startswith(('flashcomm', 'vllm', "
            "'matplotlib'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = eval(proc.stdout.strip().splitlines()[-1])
    assert "flashcomm.ops" in loaded and "flashcomm.vllm.plugin" in loaded, loaded
    tools = [m for m in loaded if m.startswith("flashcomm.tools") or m.split(".")[0] in
             ("vllm", "matplotlib")]
    assert not tools, tools  # no tool, and no vLLM before the plugin is enabled


def test_cli_help_needs_neither_torch_nor_flashcomm():
    loaded, out = _cli_alone("--help")
    assert loaded["code"] == 0
    for command in ("demo", "bench", "tune", "serve"):
        assert command in out
    assert loaded["modules"] == [], loaded


def test_cli_command_help_loads_its_tools():
    # The commands' options take their defaults from the tools (which need torch).
    loaded, out = _cli_alone("tune", "--help")
    assert loaded["code"] == 0 and "--margin" in out and "--output" in out
    assert "flashcomm.tools.bench.tune" in loaded["modules"], loaded


def test_serve_help_hands_over_to_vllm_without_flashcomm():
    pytest.importorskip("vllm", reason="vLLM is not importable; install the extra: "
                        "make install-vllm")
    # vLLM loads its general plugins (flashcomm's among them) while it builds its parser;
    # none here, so what is loaded is what the CLI and vLLM's own CLI load.
    loaded, out = _cli_alone("serve", "--help", VLLM_PLUGINS="")
    assert loaded["code"] == 0
    assert "usage: flashcomm serve MODEL" in out and "usage: vllm serve" in out, out[-3000:]
    # torch is vLLM's; the CLI loaded no flashcomm module (nor the op library).
    assert not [m for m in loaded["modules"] if m.startswith("flashcomm")], loaded
