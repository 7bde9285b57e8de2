"""What produced a benchmark's figures: the source commit, the versions, the CPU.

:func:`provenance` is meant to be stored in every results file (issue 21: "every results
file records the commit, the torch/vLLM versions and the CPU model and flags"). It reads
everything without importing torch or vLLM (package metadata, ``/proc``, ``git``), so a
benchmark can call it before or after it starts its engines, and it never fails: a value
it cannot read is ``None``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

# The source tree when flashcomm runs from one (python/flashcomm/tools -> the root).
_SOURCE_ROOT = Path(__file__).resolve().parents[3]

# CPU features the kernels in play dispatch on (ATen, oneDNN, vLLM's CPU kernels,
# flashcomm's own): the ones this CPU has are listed first in "cpu_flags_dispatch".
DISPATCH_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                  "avx512_vnni", "avx_vnni", "avx512_fp16", "amx_tile", "amx_int8",
                  "amx_bf16", "amx_fp16")

# Environment settings that change which kernels run or how many threads do.
_ENV_KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS",
             "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "FLASHCOMM_LIB")


def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    out: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            out.setdefault(key.strip(), value.strip())
    return out


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _mem_total_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def provenance(source_root: Optional[Path] = None) -> dict[str, Any]:
    """The record of what ran: ``commit`` (``git rev-parse HEAD`` of ``source_root``,
    default the source tree this module is in; None outside a git checkout), ``dirty``
    (uncommitted changes to tracked files), ``branch``, the versions of ``flashcomm``,
    ``torch``, ``vllm`` (the ``vllm`` or ``vllm-cpu`` distribution), ``transformers`` and
    ``python``; the machine: ``cpu_model``, ``cpus`` (logical CPUs this process may run
    on), ``cpu_flags_dispatch`` (of :data:`DISPATCH_FLAGS`, those the CPU has),
    ``cpu_flags`` (every flag), ``mem_total_gib``, ``hypervisor`` (from the ``hypervisor``
    flag), ``kernel``; ``env`` (the settings of :data:`_ENV_KEYS` that are set);
    ``loadavg`` (1, 5, 15 minutes, now) and ``utc`` (ISO 8601, now)."""
    root = source_root or _SOURCE_ROOT
    info = _cpuinfo()
    flags = info.get("flags", "").split()
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 0
    return {
        "commit": _git(root, "rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD"),
        "flashcomm": _dist_version("flashcomm"),
        "torch": _dist_version("torch"),
        "vllm": _dist_version("vllm", "vllm-cpu"),
        "transformers": _dist_version("transformers"),
        "python": platform.python_version(),
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpus": cpus,
        "cpu_flags_dispatch": [f for f in DISPATCH_FLAGS if f in flags],
        "cpu_flags": flags,
        "mem_total_gib": _mem_total_gib(),
        "hypervisor": "hypervisor" in flags,
        "kernel": platform.release(),
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def provenance_line(p: dict[str, Any]) -> str:
    """One line for a text report: CPU, dispatch flags, versions, commit."""
    commit = (p.get("commit") or "?")[:12] + ("+dirty" if p.get("dirty") else "")
    return (f"{p.get('cpu_model')}, {p.get('cpus')} CPUs "
            f"({' '.join(p.get('cpu_flags_dispatch') or []) or '-'}); torch {p.get('torch')}, "
            f"vLLM {p.get('vllm')}, flashcomm {commit}; load {p.get('loadavg')} at "
            f"{p.get('utc')}")


STAMP_PREFIX = "# provenance: "


def stamp(path: Path, record: Optional[dict[str, Any]] = None) -> bool:
    """Records ``record`` (default :func:`provenance`) in the results file ``path``
    unless it has one: the ``provenance`` key of a JSON object, the first line
    ``# provenance: {json}`` of a text file. Other files (plots) are left to the
    record of their JSON / text sibling. Returns whether ``path`` was changed."""
    import json
    record = record or provenance()
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or "provenance" in doc:
            return False
        doc["provenance"] = record
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return True
    if path.suffix == ".txt":
        text = path.read_text()
        if text.startswith(STAMP_PREFIX):
            return False
        path.write_text(STAMP_PREFIX + json.dumps(record, separators=(",", ":")) + "\n" + text)
        return True
    return False


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m flashcomm.tools.provenance [--stamp FILE...]``: print this machine's
    record, or write it into results files that lack one (``benchmarks/run_cpu.sh``)."""
    import argparse
    import json
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--stamp", nargs="+", type=Path, metavar="FILE",
                        help="results files (.json / .txt) to record the provenance in")
    args = parser.parse_args(argv)
    record = provenance()
    if not args.stamp:
        print(json.dumps(record, indent=1))
        return 0
    for path in args.stamp:
        if stamp(path, record):
            print(f"provenance recorded in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
