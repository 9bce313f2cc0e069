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
// Codes (256 sorted values in [-1, 1] or [0, 1]; encoding picks the nearest value):
//   dynamic (the default; "dynamic tree" code of the paper): decade i = 0..6 covers normalized
//     magnitudes (1e-7 * 10^i, 1e-6 * 10^i] with 2^i (signed) or 2^(i+1) (unsigned) equal cells of
//     width w_i whose centers are the codes, plus 0 and 1. Bound: for |y| in decade i,
//     |y - q(y)| <= w_i / 2 (the nearest code is no farther than the center of y's own cell), with
//     w_i = 0.9e-6 * 10^i / 2^i (signed) or half that (unsigned); |y| <= 1e-7 decodes to 0 or to a
//     code within |y| (unsigned: to 0.5e-7, the code has no zero, see quant8.cc). At the top decade
//     the bound is 0.70% (signed) / 0.35% (unsigned) of the absmax.
//   linear: uniform levels (k - 127) / 127 (signed) or k / 255 (unsigned); error <= 1/254 or 1/510.
// The dynamic code was chosen by measuring both on AdamW / Lion moments of a synthetic heavy-tailed
// gradient stream (bench/optim, "q8_code_error" records; docs/benchmarks.md): the second moment
// spans many decades inside a block and the linear code flushes most of it to zero.
//
// Non-finite values: a block holding NaN or +-Inf gets a non-finite absmax, and every element of it
// decodes to NaN or +-Inf: a non-finite state is never silently replaced by a finite one.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "base/dtype.h"
#include "optim/config.h"

namespace shardopt::optim {

inline constexpr int64_t kQ8BlockElems = 256;

inline int64_t q8_num_blocks(int64_t elements) { return (elements + kQ8BlockElems - 1) / kQ8BlockElems; }

enum class Q8CodeKind { kDynamic, kLinear };

// 256 ascending code values and the encoder's decision thresholds (midpoints between neighbours).
struct Q8Codebook {
  std::array<float, 256> values{};
  std::array<float, 257> midpoints{};  // midpoints[k] = (values[k-1] + values[k]) / 2, k in 1..255; [256] = +inf

  // Index of the nearest value (ties toward the lower one) by binary search; a NaN gives 0.
  uint8_t encode(float y) const {
    unsigned c = 0;
    for (unsigned step = 128; step >= 1; step >>= 1) c += (midpoints[c + step] < y) ? step : 0u;
    return static_cast<uint8_t>(c);
  }

  // Same result as encode() for |y| <= 1, without the 8 dependent steps: the top 16 bits of |y|
  // (exponent and 7 mantissa bits) index the code of the interval's lower (y >= 0) or most negative
  // (y < 0) end; an interval is narrower than two code spacings (every code's relative spacing is
  // >= 2^-8), so two compares finish. A NaN gives some code (its block's absmax is NaN anyway).
  uint8_t encode_fast(float y) const {
    uint32_t bits;
    std::memcpy(&bits, &y, sizeof bits);
    uint32_t key = (bits & 0x7fffffffu) >> 16;
    key = key < kKeys ? key : kKeys - 1;
    unsigned c = (bits >> 31) ? start_negative[key] : start_positive[key];
    c += midpoints[c + 1] < y;
    c += midpoints[c + 1] < y;
    return static_cast<uint8_t>(c);
  }

  static constexpr uint32_t kKeys = 0x3f80u + 1;  // keys of |y| in [0, 1]
  std::array<uint8_t, kKeys> start_positive{}, start_negative{};
  uint8_t gather_pad[4]{};  // the vector encoder reads 4 bytes at start_negative[kKeys - 1]
};

// The codebook of a kind; is_signed = false gives the unsigned code (for values known to be >= 0).
const Q8Codebook& q8_codebook(Q8CodeKind kind, bool is_signed);

// The documented worst-case |y - decode(encode(y))| for a normalized |y| <= 1 under a code.
double q8_error_bound(Q8CodeKind kind, bool is_signed, double y);

// One state slot of a run of elements in compact storage. For q8 the run starts on a block boundary
// of its tensor and absmax holds q8_num_blocks(run length) values. For f32 this is not used.
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

// Quantizes x[0..n) as consecutive blocks (starting at a block boundary) with the dynamic code.
// use_avx512: take the AVX-512 loops where the CPU has them (checked at run time); they give the
// same codes and values bit for bit as the portable loops (encode_fast per element).
void q8_quantize(const float* x, int64_t n, bool nonnegative, uint8_t* codes, float* absmax,
                 Q8CodeKind kind = Q8CodeKind::kDynamic, bool use_avx512 = true);
void q8_dequantize(const uint8_t* codes, const float* absmax, int64_t n, bool nonnegative, float* out,
                   Q8CodeKind kind = Q8CodeKind::kDynamic, bool use_avx512 = true);

// Elements [0, n) of a compact state <-> fp32 (bf16: exact widening / round to nearest even).
void load_compact(const CompactState& state, int64_t n, float* out, bool use_avx512 = true);
void store_compact(const CompactState& state, int64_t n, const float* in, bool use_avx512 = true);
// Bytes of n elements of compact state (q8: codes and absmax).
int64_t compact_bytes(StateDType dtype, int64_t n);

}  // namespace shardopt::optim
