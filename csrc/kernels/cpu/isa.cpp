#include "kernels/cpu/isa.h"

#include "kernels/cpu/reduce.h"

#include <ATen/Version.h>
#include <ATen/cpu/Utils.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <string_view>
#include <unordered_map>

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

namespace {

constexpr unsigned bit(CpuExt ext) { return 1u << static_cast<int>(ext); }
constexpr unsigned kAllExts = ~0u;
constexpr unsigned kVnni512 = bit(CpuExt::kAvx512Vnni);
constexpr unsigned kBf16512 = kVnni512 | bit(CpuExt::kAvx512Bf16);
constexpr unsigned kAmx = kBf16512 | bit(CpuExt::kAmxInt8) | bit(CpuExt::kAmxBf16);

// oneDNN's names (case-insensitive, as oneDNN reads them) and what each admits.
// AVX512_CORE without VNNI computes int8 with 16-bit pair sums, like AVX2.
struct CapLevel {
  std::string_view name;
  unsigned mask;
};
constexpr CapLevel kCapLevels[] = {
    {"SSE41", 0u},
    {"AVX", 0u},
    {"AVX2", 0u},
    {"AVX2_VNNI", bit(CpuExt::kAvxVnni)},
    {"AVX2_VNNI_2", bit(CpuExt::kAvxVnni)},
    {"AVX512_CORE", 0u},
    {"AVX512_CORE_VNNI", kVnni512},
    {"AVX512_CORE_BF16", kBf16512},
    {"AVX512_CORE_FP16", kBf16512},
    {"AVX10_1_512", kBf16512},
    {"AVX512_CORE_AMX", kAmx},
    {"AVX10_1_512_AMX", kAmx},
    {"AVX512_CORE_AMX_FP16", kAmx},
    {"AVX10_1_512_AMX_FP16", kAmx},
    {"ALL", kAllExts},
};

bool hardware_has(CpuExt ext) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto has = [&](const char* feature) {
    const auto it = caps.find(feature);
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  };
  switch (ext) {
    case CpuExt::kAvxVnni:
      return has("avx_vnni");
    case CpuExt::kAvx512Vnni:
      return has("avx512_vnni");
    case CpuExt::kAvx512Bf16:
      return has("avx512_bf16");
    case CpuExt::kAmxInt8:
      return has("amx_int8");
    case CpuExt::kAmxBf16:
      return has("amx_bf16");
  }
  return false;
}

}  // namespace

unsigned onednn_cap_mask(const char* value) {
  if (value == nullptr || *value == '\0') return kAllExts;
  std::string upper(value);
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (const CapLevel& level : kCapLevels) {
    if (level.name == upper) return level.mask;
  }
  return kAllExts;
}

bool cpu_has(CpuExt ext) {
  static const unsigned allowed = [] {
    const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
    if (cap == nullptr || *cap == '\0') cap = std::getenv("DNNL_MAX_CPU_ISA");
    unsigned mask = 0;
    for (CpuExt e : {CpuExt::kAvxVnni, CpuExt::kAvx512Vnni, CpuExt::kAvx512Bf16,
                     CpuExt::kAmxInt8, CpuExt::kAmxBf16}) {
      if (hardware_has(e)) mask |= bit(e);
    }
    return mask & onednn_cap_mask(cap);
  }();
  return (allowed & bit(ext)) != 0;
}

const char* cpu_ext_name(CpuExt ext) {
  switch (ext) {
    case CpuExt::kAvxVnni:
      return "avx_vnni";
    case CpuExt::kAvx512Vnni:
      return "avx512_vnni";
    case CpuExt::kAvx512Bf16:
      return "avx512_bf16";
    case CpuExt::kAmxInt8:
      return "amx_int8";
    case CpuExt::kAmxBf16:
      return "amx_bf16";
  }
  return "?";
}

// Tables of the multi-ISA kernels (entries registered by the *_kernel.cpp copies).
KernelTable<SumFn> sum_kernel;

}  // namespace flashcomm::kernels
