"""CPU views: running the whole stack in one process as it runs on a lesser x86 CPU.

A view caps every layer that picks a kernel by the CPU's features, together:

* ATen's kernels (and flashcomm's multi-ISA kernels, which follow ATen's capability):
  ``ATEN_CPU_CAPABILITY``;
* oneDNN (torch's mkldnn / onednn ops, weight packing, qlinear) and flashcomm's own
  use of AVX512-BF16, VNNI and AMX (``flashcomm::kernels::cpu_has``):
  ``ONEDNN_MAX_CPU_ISA``;
* vLLM's choice of its ``_C`` library and kernels, and Inductor's vector ISA: the
  ``torch.cpu`` probes they call, answered False by a generated ``sitecustomize.py``
  in every Python process started with :func:`view_env`.

Every setting must be in place before the process imports torch, so a view applies to a
child process. The instructions stay available to the process: a view runs the code
paths of the lesser CPU, it does not prove that such a CPU would run them (an
instruction the code should not have used would still execute here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# ATen's capabilities from the lowest; a view runs where the machine's is at least its own.
ATEN_ORDER = ["default", "avx2", "avx512"]

_AMX = ("_is_amx_tile_supported", "_is_amx_fp16_supported")
_AVX512 = ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported")


@dataclass(frozen=True)
class CpuView:
    """One class of CPU. ``aten`` / ``onednn``: the two variables ('' = uncapped);
    ``hidden``: the ``torch.cpu`` probes answered False; ``like``: CPUs of the class."""

    name: str
    aten: str
    onednn: str
    hidden: tuple[str, ...]
    like: str

    def env(self) -> dict[str, str]:
        """The variables of this view (none for the machine itself)."""
        out = {}
        if self.aten:
            out["ATEN_CPU_CAPABILITY"] = self.aten
        if self.onednn:
            out["ONEDNN_MAX_CPU_ISA"] = self.onednn
        return out


VIEWS: dict[str, CpuView] = {v.name: v for v in [
    CpuView("", "", "", (), "this machine, uncapped"),
    CpuView("no-amx", "avx512", "AVX512_CORE_BF16", _AMX,
            "AVX512 with VNNI and BF16, no AMX (AMD Zen 4/5, Intel Cooper Lake)"),
    CpuView("avx512", "avx512", "AVX512_CORE", _AMX + _AVX512[1:],
            "AVX512 without VNNI or BF16 (Intel Skylake-SP)"),
    CpuView("avx2", "avx2", "AVX2", _AMX + _AVX512,
            "AVX2 only (AMD Zen 2/3: EPYC Rome/Milan; Intel Haswell/Broadwell)"),
    CpuView("default", "default", "SSE41", _AMX + _AVX512,
            "no AVX: flashcomm's and ATen's portable kernels"),
]}


def machine_aten() -> str:
    """ATen's capability on this machine, as ATen detects it (lower-case)."""
    import torch
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return cap if cap in ATEN_ORDER else "default"  # another architecture: portable only


def views_below_machine() -> list[str]:
    """The views that run other code paths than this machine does, lowest last: every
    view whose ATen level is below the machine's, and the AVX512 views below this CPU's
    extensions (they cap oneDNN and flashcomm's extension use at the same width)."""
    import torch
    best = ATEN_ORDER.index(machine_aten())
    names = []
    for view in VIEWS.values():
        if not view.aten:
            continue
        level = ATEN_ORDER.index(view.aten)
        if level < best:
            names.append(view.name)
        elif level == best and view.hidden and any(
                getattr(torch.cpu, p, lambda: False)() for p in view.hidden):
            names.append(view.name)  # same width, fewer extensions than this CPU's
    return names


def sitecustomize_dir(tmp: Path, name: str) -> Optional[str]:
    """A directory holding a ``sitecustomize.py`` that answers the view's probes False
    in every Python process started with it on PYTHONPATH; None for the machine."""
    view = VIEWS[name]
    if not view.hidden:
        return None
    d = Path(tmp) / f"cpu_view_{name}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(
        f"# Written by flashcomm.tools.cpu_view: CPU view {name!r}, {view.like}.\n"
        f"# Dispatch as on such a CPU; the instructions stay available.\n"
        f"import torch.cpu\n\n"
        f"for _probe in {view.hidden!r}:\n"
        f"    if hasattr(torch.cpu, _probe):\n"
        f"        setattr(torch.cpu, _probe, lambda: False)\n")
    return str(d)


def view_env(tmp: Path, name: str, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the view's variables and its
    ``sitecustomize.py`` first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    env.update(VIEWS[name].env())
    site = sitecustomize_dir(tmp, name)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    return env


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m flashcomm.tools.cpu_view VIEW -- COMMAND...``: runs COMMAND (a benchmark,
    a test run) with the view's settings, e.g. the AVX2 figures of BENCHMARKS.md on an
    AVX512 machine."""
    import argparse
    import subprocess
    import sys
    import tempfile

    parser = argparse.ArgumentParser(
        prog="python -m flashcomm.tools.cpu_view",
        description="Run a command as on a lesser x86 CPU (ATen, oneDNN, flashcomm and "
                    "vLLM dispatch capped together). Views: " +
                    "; ".join(f"{n}: {v.like}" for n, v in VIEWS.items() if n))
    parser.add_argument("view", choices=[n for n in VIEWS if n])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    with tempfile.TemporaryDirectory(prefix="fc_view_") as tmp:
        return subprocess.call(command, env=view_env(Path(tmp), args.view))


if __name__ == "__main__":
    raise SystemExit(main())
