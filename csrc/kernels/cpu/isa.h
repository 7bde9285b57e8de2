// Multi-ISA CPU kernels.
//
// Every csrc/kernels/cpu/*_kernel.cpp is compiled once per instruction set
// (DEFAULT, AVX2, AVX512 on x86-64; DEFAULT elsewhere) with CPU_CAPABILITY
// defined, as ATen's own kernels are: at::vec then picks the matching vector
// implementation and puts it in an inline namespace named after the ISA, so the
// copies never collide. Each copy registers its entry point in a KernelTable;
// callers take the entry for the ISA torch itself runs with
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), capped at the
// best ISA this build compiled. The library therefore runs on any x86-64 CPU and
// uses AVX512 where the machine has it; tests can force each variant with
// ATEN_CPU_CAPABILITY=default|avx2|avx512.
#pragma once

#include <array>
#include <stdexcept>

namespace flashcomm::kernels {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
inline constexpr int kIsaCount = 3;

// The ISA whose kernels run in this process (decided once, at first use).
Isa cpu_isa();
const char* isa_name(Isa isa);

// x86 extensions beyond the ATen capability that decide which path flashcomm takes:
// its own AVX512-BF16 norm and, through packing, oneDNN's VNNI / AMX / BF16 GEMMs.
enum class CpuExt : int { kAvxVnni, kAvx512Vnni, kAvx512Bf16, kAmxInt8, kAmxBf16 };

// Whether this process may use `ext`: the CPU has it and ONEDNN_MAX_CPU_ISA (or its old
// name DNNL_MAX_CPU_ISA), when set, admits it. oneDNN honours that cap for its own
// kernels; flashcomm honours it too, so that one variable (with ATEN_CPU_CAPABILITY
// for the vector width) runs the whole stack as on a CPU without the extension. An
// unrecognised value caps nothing, as in oneDNN. Decided once per process.
bool cpu_has(CpuExt ext);
const char* cpu_ext_name(CpuExt ext);

// The extensions a value of ONEDNN_MAX_CPU_ISA admits, as a mask of 1 << CpuExt (every
// bit for null, empty, ALL or an unrecognised value). Exposed for the core tests.
unsigned onednn_cap_mask(const char* value);

// Entry points of one kernel, one per ISA; filled at library load by the
// FLASHCOMM_REGISTER_CPU_KERNEL lines of the *_kernel.cpp copies.
template <typename Fn>
class KernelTable {
 public:
  constexpr KernelTable() = default;
  void set(Isa isa, Fn* fn) { fns_[static_cast<int>(isa)] = fn; }
  // The entry for cpu_isa(), or the best lower ISA that has one. Every kernel
  // has a DEFAULT copy, so none at all means the kernel was not built in.
  Fn* get() const {
    for (int i = static_cast<int>(cpu_isa()); i >= 0; --i) {
      if (fns_[i] != nullptr) return fns_[i];
    }
    throw std::logic_error("flashcomm: a CPU kernel was not compiled into this library");
  }

 private:
  std::array<Fn*, kIsaCount> fns_{};
};

}  // namespace flashcomm::kernels

// The ISA of the translation unit being compiled (only inside *_kernel.cpp).
#if defined(CPU_CAPABILITY_AVX512)
#define FLASHCOMM_THIS_ISA ::flashcomm::kernels::Isa::kAvx512
#elif defined(CPU_CAPABILITY_AVX2)
#define FLASHCOMM_THIS_ISA ::flashcomm::kernels::Isa::kAvx2
#else
#define FLASHCOMM_THIS_ISA ::flashcomm::kernels::Isa::kDefault
#endif

#define FLASHCOMM_ISA_CONCAT_(a, b) a##b
#define FLASHCOMM_ISA_CONCAT(a, b) FLASHCOMM_ISA_CONCAT_(a, b)

// Registers `fn` (this ISA's copy) as `table`'s entry for FLASHCOMM_THIS_ISA.
#define FLASHCOMM_REGISTER_CPU_KERNEL(table, fn)                                      \
  static const bool FLASHCOMM_ISA_CONCAT(flashcomm_kernel_registered_, __LINE__) = \
      (table.set(FLASHCOMM_THIS_ISA, &fn), true)
