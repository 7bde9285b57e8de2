"""Builds the C++ op library with CMake against the *installed* torch.

Install with build isolation off, so the build sees the torch in the
environment rather than fetching another one:

    pip install --no-build-isolation .        (or -e . for development)

Supported torch: 2.11 through 2.13 (SUPPORTED_TORCH; pyproject.toml's ranges say the
same). The library is tied to the torch release it is compiled against: it records it
(csrc/build_info.cpp) and the Python loader refuses it under another release.

Environment:
    FLASHCOMM_BUILD_TESTS=1   also build the GoogleTest suites (ctest --test-dir build/cmake)
    FLASHCOMM_SANITIZE=1      AddressSanitizer + UndefinedBehaviorSanitizer build
    FLASHCOMM_BUILD_DIR=path  CMake build directory (default build/cmake)
    FLASHCOMM_JOBS=n          parallel build jobs (default: CPU count)
    FLASHCOMM_TORCH_FROM_PYTHON=1|0  locate torch through this Python (CMake's
                              FLASHCOMM_TORCH_FROM_PYTHON) rather than torch's CMake config;
                              default: 1 for a CUDA or ROCm torch, 0 for a CPU one
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIB_NAME = "libflashcomm_ops.so"
# (major, minor) of the oldest and newest supported torch releases.
SUPPORTED_TORCH = ((2, 11), (2, 13))


def _flag(name: str, default: str = "0") -> str:
    return "ON" if os.environ.get(name, default).lower() in ("1", "on", "true", "yes") else "OFF"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # A plain shared library loaded with torch.ops.load_library, not a Python
        # module: one file serves every Python version.
        return os.path.join(*fullname.split(".")[:-1], LIB_NAME)

    def build_extension(self, ext: Extension) -> None:
        import torch

        _check_torch(torch.__version__)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("FLASHCOMM_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if _has_ninja() else []
        # torch's CMake config of a CUDA (or ROCm) build looks for a CUDA toolkit, which a
        # GPU image may lack or hide behind a wrapper nvcc ("cannot find the CUDA
        # libraries"), although flashcomm compiles no device code: there the torch target
        # comes from Python (cmake/TorchFromPython.cmake; same sources and flags).
        accelerated = torch.version.cuda is not None or getattr(torch.version, "hip", None)
        from_python = _flag("FLASHCOMM_TORCH_FROM_PYTHON",
                            default="1" if accelerated else "0")
        # ccache where the machine has it, with paths relative to the checkout: the GPU
        # check's rehearsal builds (scripts/gpu_check.sh, same flags) then reuse these
        # objects instead of compiling the library twice more.
        launcher = ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"] if shutil.which("ccache") else []
        os.environ.setdefault("CCACHE_BASEDIR", str(ROOT))
        subprocess.check_call(
            ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator, *launcher,
             f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
             f"-DFLASHCOMM_TORCH_FROM_PYTHON={from_python}",
             *([f"-DPython_EXECUTABLE={sys.executable}"] if from_python == "ON" else []),
             f"-DFLASHCOMM_BUILD_TESTS={_flag('FLASHCOMM_BUILD_TESTS')}",
             f"-DFLASHCOMM_SANITIZE={_flag('FLASHCOMM_SANITIZE')}",
             "-DCMAKE_BUILD_TYPE=" + ("RelWithDebInfo" if _flag("FLASHCOMM_SANITIZE") == "ON"
                                      else "Release")])
        jobs = os.environ.get("FLASHCOMM_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        # The installed copy, not the build tree's: CMake's install step replaces the
        # build machine's torch path in the RUNPATH with $ORIGIN/../torch/lib.
        staging = build_dir / "package-staging"
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.check_call(["cmake", "--install", str(build_dir), "--prefix", str(staging),
                               "--component", "library"])
        installed = glob.glob(str(staging / "lib*" / LIB_NAME))
        if len(installed) != 1:
            raise RuntimeError(f"cmake --install left {installed} under {staging}, "
                               f"expected one {LIB_NAME}")
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(installed[0], out_dir / LIB_NAME)


def _check_torch(version: str) -> None:
    """Fails the build early, naming the range, when the installed torch is unsupported."""
    try:
        release = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        raise RuntimeError(
            f"flashcomm: cannot parse the installed torch version {version!r}") from None
    lo, hi = SUPPORTED_TORCH
    if not lo <= release <= hi:
        raise RuntimeError(
            f"flashcomm builds against torch {lo[0]}.{lo[1]} through {hi[0]}.{hi[1]}; the "
            f"installed torch is {version}. Install a supported torch first, then build "
            "with `pip install --no-build-isolation .`.")


def _has_ninja() -> bool:
    try:
        subprocess.check_output(["ninja", "--version"])
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


setup(ext_modules=[CMakeExtension("flashcomm._ops")], cmdclass={"build_ext": CMakeBuild})
