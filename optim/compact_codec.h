// Compact state (optim/quant8.h: CompactState) <-> fp32 over a run of elements, inline so that each
// caller compiles it into its own per-instruction-set wrappers (quant8.cc: load_compact /
// store_compact / q8_quantize / q8_dequantize; compact_step.cc: the bf16 tiles of the fused step).
// Internal to optim/. q8 is the float8 code (optim/quant8_codec.h); bf16 is an exact widening and a
// round to nearest even. Every operation is IEEE-exact or integer, so all builds agree bit for bit.
#pragma once

#include <cstdint>

#include "optim/quant8.h"
#include "optim/quant8_codec.h"
#include "optim/simd_util.h"

namespace shardopt::optim {

// Storage of `s` advanced by `offset` elements; offset is a multiple of kQ8BlockElems for q8 (the
// run must start on a block boundary: its absmax index is offset / kQ8BlockElems).
inline CompactState advanced(const CompactState& s, int64_t offset) {
  CompactState out = s;
  const int64_t value_bytes = s.dtype == proto::STATE_BF16 ? 2 : 1;
  out.values = static_cast<unsigned char*>(s.values) + offset * value_bytes;
  if (s.dtype == proto::STATE_Q8) out.absmax = s.absmax + offset / kQ8BlockElems;
  return out;
}

// Elements [0, n) of `s` (bf16 or q8; q8 from a block boundary, whole blocks but a short last one).
SHARDOPT_CODEC void decode_compact(const CompactState& s, int64_t n, float* out) {
  if (s.dtype == proto::STATE_BF16) {
    const auto* v = static_cast<const bf16*>(s.values);
    for (int64_t i = 0; i < n; ++i) out[i] = load_as_float(v[i]);
  } else if (s.nonnegative) {
    codec::dequantize<false>(static_cast<const uint8_t*>(s.values), s.absmax, n, out, kQ8BlockElems);
  } else {
    codec::dequantize<true>(static_cast<const uint8_t*>(s.values), s.absmax, n, out, kQ8BlockElems);
  }
}

SHARDOPT_CODEC void encode_compact(const CompactState& s, int64_t n, const float* in) {
  if (s.dtype == proto::STATE_BF16) {
    auto* v = static_cast<bf16*>(s.values);
    for (int64_t i = 0; i < n; ++i) v[i] = to_bf16_rne(in[i]);
  } else if (s.nonnegative) {
    codec::quantize<false>(in, n, static_cast<uint8_t*>(s.values), s.absmax, kQ8BlockElems);
  } else {
    codec::quantize<true>(in, n, static_cast<uint8_t*>(s.values), s.absmax, kQ8BlockElems);
  }
}

}  // namespace shardopt::optim
