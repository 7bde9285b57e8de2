// The torch release this library was compiled against, stored as a string that can be
// read from the file without loading it. torch's C++ ABI (mangled names, class layouts
// of c10 / ATen / c10d) belongs to one release, so a library built for another torch
// may fail to load or, worse, load and misbehave. Python's loader
// (python/flashcomm/_loader.py) finds this record in the file's bytes and refuses a
// library whose torch release differs from the running one before dlopen ever sees it.
//
// The value comes from the headers the library is compiled against (not from CMake or
// pip metadata), so it is the release the ABI actually ties it to.
#include <torch/headeronly/version.h>

// Format (the loader's contract): "FLASHCOMM_BUILT_FOR_TORCH=<major>.<minor>.<patch>", NUL.
// Exported and marked used, so neither the compiler nor the linker drops it; a libtorch
// program may read it too (dlsym "flashcomm_built_for_torch").
extern "C" __attribute__((visibility("default"), used))
const char flashcomm_built_for_torch[] = "FLASHCOMM_BUILT_FOR_TORCH=" TORCH_VERSION;
