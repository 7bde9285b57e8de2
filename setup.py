"""Builds the C++ op library with CMake against the *installed* torch.

Install with build isolation off, so the build sees the torch in the
environment rather than fetching another one:

    pip install --no-build-isolation -e .

Environment:
    FLASHCOMM_BUILD_TESTS=1   also build the GoogleTest suites (ctest --test-dir build/cmake)
    FLASHCOMM_SANITIZE=1      AddressSanitizer + UndefinedBehaviorSanitizer build
    FLASHCOMM_BUILD_DIR=path  CMake build directory (default build/cmake)
    FLASHCOMM_JOBS=n          parallel build jobs (default: CPU count)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIB_NAME = "libflashcomm_ops.so"


def _flag(name: str) -> str:
    return "ON" if os.environ.get(name, "0").lower() in ("1", "on", "true", "yes") else "OFF"


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

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("FLASHCOMM_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if _has_ninja() else []
        subprocess.check_call(
            ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator,
             f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
             f"-DFLASHCOMM_BUILD_TESTS={_flag('FLASHCOMM_BUILD_TESTS')}",
             f"-DFLASHCOMM_SANITIZE={_flag('FLASHCOMM_SANITIZE')}",
             "-DCMAKE_BUILD_TYPE=" + ("RelWithDebInfo" if _flag("FLASHCOMM_SANITIZE") == "ON"
                                      else "Release")])
        jobs = os.environ.get("FLASHCOMM_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / LIB_NAME, out_dir / LIB_NAME)


def _has_ninja() -> bool:
    try:
        subprocess.check_output(["ninja", "--version"])
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


setup(ext_modules=[CMakeExtension("flashcomm._ops")], cmdclass={"build_ext": CMakeBuild})
