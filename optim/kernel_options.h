// How the CPU optimizer loops run: on which threads, and which instruction-set build.
//
// The element-wise steps (optim/elementwise.h), the compact-state steps (optim/compact_step.h) and
// the q8 codec (optim/quant8.h) are each compiled three times from one source: for the x86-64
// baseline ("portable", SSE2), for AVX2 + FMA and for AVX-512 (F, BW, VL, DQ) + FMA. (The compact
// step's q8 ranges in the AVX2 and AVX-512 builds are intrinsics around one shared loop source,
// optim/compact_step_q8_ranges.inc.) A call runs the widest build the CPU has (checked once at run
// time), no wider than KernelOptions::max_isa; tests and benchmarks lower max_isa to force a narrower
// build. The q8 codec gives the same codes and values bit for bit in every build; the fp32 update
// loops may differ in the last bit between the portable build and the FMA builds (fused multiply-adds).
#pragma once

#include "base/thread_pool.h"

namespace shardopt::optim {

// Ordered: each set includes the previous one.
enum class Isa { kPortable, kAvx2, kAvx512 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

// Whether this CPU runs the build for `isa` (checked once per process).
inline bool cpu_supports(Isa isa) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::kPortable: return true;
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512: return avx512;
  }
  return false;
}

// The widest build this CPU runs that is no wider than `limit`.
inline Isa select_isa(Isa limit) {
  if (limit >= Isa::kAvx512 && cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
  if (limit >= Isa::kAvx2 && cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kPortable;
}

// How a step runs on this CPU. Results never depend on the pool size (work is split into
// independent pieces, each computed by the same code whichever thread runs it).
struct KernelOptions {
  ThreadPool* pool = nullptr;    // nullptr or size 1: the calling thread does all the work
  Isa max_isa = Isa::kAvx512;    // the widest instruction-set build to use where the CPU has it
};

}  // namespace shardopt::optim
