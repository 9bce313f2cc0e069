// Compact optimizer-state storage: bf16, and 8-bit block-wise quantization (Dettmers et al. 2022,
// "8-bit Optimizers via Block-wise Quantization"; the layout bitsandbytes and torchao use).
//
// q8: a tensor's state is cut into blocks of kQ8BlockElems consecutive elements of the tensor's
// row-major flattened index (block j = elements [256 j, 256 j + 256); the last block may be short).
// Each block stores one fp32 absmax A_j = max |x| over the block and one uint8 code per element;
// x is decoded as code_value[code] * A_j. Blocks are defined on the GLOBAL element index: the
// planner starts every shard piece of an element-wise tensor at a multiple of kQ8BlockElems
// (PlanRequest.state_block_elems), so any world size, stage, layout or checkpoint holds whole blocks
// and quantizes exactly the same sets of values: N ranks == 1 rank bit for bit.
//
// Codes (what the 8 bits of an element mean; y = x / A is the normalized value, |y| <= 1):
//   float8 (kFloat8, the code q8 state is stored in): a small float read off the bits of y, closed
//     form both ways (a few integer operations per value, no table, no search; optim/quant8_codec.h):
//     signed (sign + 7 bits; m, momentum): |y| rounded to 3 mantissa bits over 15.75 binades, codes
//       1..127 = 2^-16 * 1.25 .. 1.0, code 0 = 0. Bound: |y - q(y)| <= |y| / 16 for
//       |y| >= t_s = 2^-16 * 1.1875; below t_s, y decodes to 0 (error |y| < t_s).
//     unsigned (8 bits; AdamW v, a second moment): stored in the sqrt domain, s = sqrt(y) (computed as
//       sqrt(x) * (1 / sqrt(A)), which AdamW has at hand: it computes sqrt(v)) rounded to 4 mantissa bits, codes 0..255 = s in 2^-16 * 1.0625 .. 1.0, decoded as s^2. Bound on s:
//       |s - q| <= s / 32 for s >= t_u = 2^-16 * 1.09375, else <= t_u; so on y:
//       |y - q^2| <= y (1/16 + 1/1024) for y >= t_u^2, else <= t_u^2. Code 0 is not 0: a second moment
//       decoded to 0 would turn m / (sqrt(v) + eps) into m / eps (the "zero-point problem", Li et al.
//       2023, "Memory Efficient Optimizers with 4-bit States"); an all-zero block still decodes to 0.
//     Signed scaling: y = x * (1/A) when 1/A is a normal float, else x / A; decoding is code value * A.
//   dynamic (kDynamic, the "dynamic tree" code of the paper; the q8 checkpoints written before the
//     float8 code, which load_checkpoint converts): 256 sorted values, nearest by binary search;
//     decade i = 0..6 covers (1e-7 * 10^i, 1e-6 * 10^i] with 2^i (signed) or 2^(i+1) (unsigned)
//     equal cells whose centers are the codes, plus 0 (signed) or 0.5e-7 (unsigned) and 1.
//   linear (kLinear): uniform levels (k - 127) / 127 or k / 255; error <= 1/254 or 1/510.
// float8 was chosen by measurement (bench/optim q8_bench, "q8_code_error" and "q8_kernel" records;
// docs/benchmarks.md): on AdamW moments of a heavy-tailed gradient stream its error on the update
// m / sqrt(v) is a third of the dynamic code's (relative RMS 0.030 vs 0.099: its relative precision
// is the same at every scale, where the dynamic code's falls from 0.7% at the top decade to 56% at
// 1e-4), for 1.5x the m and 3x the v error (0.016 / 0.0036 vs 0.010 / 0.0011, errors dominated by
// the largest elements, which the dynamic code holds more finely); and the fused q8 step runs at
// about the fp32 step's time, where the table codes' search and gathers made it 7-14x slower. The
// linear code flushes most of a second moment block to zero.
//
// Non-finite values: a block holding NaN or +-Inf gets a non-finite absmax, and every element of it
// decodes to NaN or +-Inf: a non-finite state is never silently replaced by a finite one.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "base/dtype.h"
#include "optim/config.h"
#include "optim/kernel_options.h"

namespace shardopt::optim {

inline constexpr int64_t kQ8BlockElems = 256;

inline int64_t q8_num_blocks(int64_t elements) { return (elements + kQ8BlockElems - 1) / kQ8BlockElems; }

enum class Q8CodeKind { kFloat8, kDynamic, kLinear };

// The code's name in checkpoints ("float8", "dynamic", "linear"); ConfigError for an unknown name.
std::string q8_code_name(Q8CodeKind kind);
Q8CodeKind q8_code_from_name(const std::string& name);

// A table code's 256 ascending values and the encoder's decision thresholds (midpoints between
// neighbours). float8 has no table.
struct Q8Codebook {
  std::array<float, 256> values{};
  std::array<float, 257> midpoints{};  // midpoints[k] = (values[k-1] + values[k]) / 2, k in 1..255; [256] = +inf

  // Index of the nearest value (ties toward the lower one) by binary search; a NaN gives 0.
  uint8_t encode(float y) const {
    unsigned c = 0;
    for (unsigned step = 128; step >= 1; step >>= 1) c += (midpoints[c + step] < y) ? step : 0u;
    return static_cast<uint8_t>(c);
  }
};

// The codebook of a table kind (kDynamic, kLinear); is_signed = false gives the unsigned code (for
// values known to be >= 0). ConfigError for kFloat8.
const Q8Codebook& q8_codebook(Q8CodeKind kind, bool is_signed);

// The normalized value of `code` under a code (decoded element = value * block absmax, the same
// float product q8_dequantize computes).
float q8_code_value(Q8CodeKind kind, bool is_signed, uint8_t code);

// The documented worst-case |y - decode(encode(y))| for a normalized |y| <= 1 under a code.
double q8_error_bound(Q8CodeKind kind, bool is_signed, double y);

// One state slot of a run of elements in compact storage. For q8 the run starts on a block boundary
// of its tensor and absmax holds q8_num_blocks(run length) values. For f32 this is not used.
// q8 storage is always float8 (Q8CodeKind::kFloat8).
struct CompactState {
  StateDType dtype = proto::STATE_F32;
  void* values = nullptr;     // bf16[n] or uint8 codes[n]
  float* absmax = nullptr;    // q8 only
  bool nonnegative = false;   // q8: values are known to be >= 0 (AdamW v): the unsigned code
};

// Whether element-wise state slot `slot` of `kind` is stored with the unsigned code: AdamW's v
// (slot 1), a second moment. The one rule the shard state and the checkpoint loader share.
inline bool q8_slot_is_nonnegative(OptimizerKind kind, int slot) {
  return kind == proto::OPTIMIZER_ADAMW && slot == 1;
}

// Quantizes x[0..n) as consecutive blocks (starting at a block boundary), float8 by default.
// max_isa: float8 runs the widest build of its loops the CPU has up to max_isa (AVX-512, AVX2 + FMA
// or portable; optim/kernel_options.h); every build gives the same codes and values bit for bit.
// The table codes run portable loops (they serve conversion and measurement, not the optimizer step).
void q8_quantize(const float* x, int64_t n, bool nonnegative, uint8_t* codes, float* absmax,
                 Q8CodeKind kind = Q8CodeKind::kFloat8, Isa max_isa = Isa::kAvx512);
void q8_dequantize(const uint8_t* codes, const float* absmax, int64_t n, bool nonnegative, float* out,
                   Q8CodeKind kind = Q8CodeKind::kFloat8, Isa max_isa = Isa::kAvx512);

// Elements per pool task of the compact-state loops (load_compact / store_compact here, the fused
// element-wise step in optim/compact_step.h): whole q8 blocks, so tasks are independent.
inline constexpr int64_t kCompactChunkElems = 128 * kQ8BlockElems;

// Elements [0, n) of a compact state <-> fp32 (bf16: exact widening / round to nearest even; q8:
// float8 from a block boundary). Split into tasks of kCompactChunkElems on exec.pool: the result is
// the single-threaded one bit for bit at any pool size, in any instruction-set build. Allocates
// nothing. Throws ConfigError when state.dtype is not bf16 or q8.
void load_compact(const CompactState& state, int64_t n, float* out, const KernelOptions& exec = {});
void store_compact(const CompactState& state, int64_t n, const float* in, const KernelOptions& exec = {});
// Bytes of n elements of compact state (q8: codes and absmax).
int64_t compact_bytes(StateDType dtype, int64_t n);

}  // namespace shardopt::optim
