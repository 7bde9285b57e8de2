#include "kernels/cpu/isa.h"

#include "kernels/cpu/reduce.h"

#include <ATen/Version.h>

#include <string>

namespace flashcomm::kernels {

namespace {

// The best ISA compiled into this build (see CMakeLists.txt).
constexpr Isa kBuiltIsa =
#if defined(FLASHCOMM_HAVE_AVX512)
    Isa::kAvx512;
#elif defined(FLASHCOMM_HAVE_AVX2)
    Isa::kAvx2;
#else
    Isa::kDefault;
#endif

Isa detect() {
  // at::get_cpu_capability() is what ATen's own kernels dispatch on: the
  // machine's best ISA unless ATEN_CPU_CAPABILITY lowers it.
  const std::string cap = at::get_cpu_capability();
  Isa isa = Isa::kDefault;
  if (cap == "AVX512") {
    isa = Isa::kAvx512;
  } else if (cap == "AVX2") {
    isa = Isa::kAvx2;
  }
  return static_cast<int>(isa) <= static_cast<int>(kBuiltIsa) ? isa : kBuiltIsa;
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

// Tables of the multi-ISA kernels (entries registered by the *_kernel.cpp copies).
KernelTable<SumFn> sum_kernel;

}  // namespace flashcomm::kernels
