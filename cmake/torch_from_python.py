"""Writes the CMake definitions of an imported `torch` target for the torch this Python
imports (cmake/TorchFromPython.cmake, FLASHCOMM_TORCH_FROM_PYTHON=ON): what torch's CMake
config gives flashcomm, without its CUDA toolkit detection.

    python cmake/torch_from_python.py OUT.cmake
"""

import re
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension


def cmake_list(items):
    return ";".join(str(i) for i in items)


def main() -> int:
    out = Path(sys.argv[1])
    prefix = Path(torch.__file__).resolve().parent
    lib = prefix / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # The interface definitions of torch's exported targets (USE_DISTRIBUTED, USE_C10D_GLOO,
    # USE_C10D_NCCL, ...): c10d headers depend on them; torch's CMake targets add them.
    defs = set()
    targets = prefix / "share/cmake/Caffe2/Caffe2Targets.cmake"
    if targets.exists():
        for value in re.findall(r'INTERFACE_COMPILE_DEFINITIONS "([^"]*)"',
                                targets.read_text()):
            defs.update(d for d in value.split(";") if d and "$" not in d)
    else:
        import torch.distributed as dist
        if dist.is_available():
            defs.add("USE_DISTRIBUTED")
            defs.update(d for d, ok in (("USE_C10D_GLOO", dist.is_gloo_available()),
                                        ("USE_C10D_NCCL", dist.is_nccl_available())) if ok)
    libs = [lib / f"lib{name}.so" for name in ("torch", "torch_cpu", "c10")]
    missing = [str(p) for p in libs if not p.exists()]
    if missing:
        sys.exit(f"torch_from_python: missing {missing}")
    flags = f"-D_GLIBCXX_USE_CXX11_ABI={abi}"
    out.write_text(f"""# Written by cmake/torch_from_python.py for {sys.executable}
set(TORCH_VERSION "{torch.__version__}")
set(TORCH_INSTALL_PREFIX "{prefix}")
set(TORCH_CXX_FLAGS "{flags}")
set(TORCH_FOUND TRUE)
add_library(torch INTERFACE IMPORTED)
set_target_properties(torch PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "{cmake_list(cpp_extension.include_paths())}"
  INTERFACE_COMPILE_DEFINITIONS "{cmake_list(sorted(defs))}"
  INTERFACE_COMPILE_OPTIONS "{flags}"
  INTERFACE_LINK_LIBRARIES "{cmake_list(libs)}")
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
