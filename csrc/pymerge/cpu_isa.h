// Run-time choice of the AVX-512 code paths of the CPU kernels (the build targets x86-64-v3 = AVX2 + FMA).
#pragma once

#include <cstdlib>
#include <cstring>

namespace pymerge {

// True when the CPU has AVX-512 F/BW/VL/DQ and PYMERGE_CPU_ISA is not "avx2" (that forces the baseline path:
// the tests run both; it is also a way out on a misbehaving CPU).
inline bool use_avx512() {
  const char* isa = std::getenv("PYMERGE_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "avx2") == 0) return false;
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

}  // namespace pymerge
