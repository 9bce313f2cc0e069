// Optimizer steps over compact (bf16 or q8, optim/quant8.h) moment storage.
//
// Element-wise (AdamW, Lion, SGD momentum): each slice is processed in tiles of 8 q8 blocks: decode
// the tile's state slots to fp32 scratch in L1, run the fp32 update loops of optim/elementwise.h on
// the tile, encode the new state (q8: new absmax and float8 codes per block), all in one function
// compiled per instruction set. One pass over memory; the update arithmetic is exactly the fp32
// path's, applied to the decoded state. AdamW's v is stored with the unsigned (sqrt-domain) code.
// Muon / NorMuon: the momentum is decoded into matrix.momentum (an fp32 scratch of the matrix's
// size), muon_step runs, and the new momentum is encoded back. NorMuon's row moment stays fp32.
//
// Element-wise tasks of kCompactChunkElems run on exec.pool (each is independent: same result at any
// pool size); the loops use AVX-512 where exec allows and the CPU has it.
#pragma once

#include <cstdint>
#include <span>

#include "optim/elementwise.h"
#include "optim/muon.h"
#include "optim/quant8.h"

namespace shardopt::optim {

inline constexpr int64_t kCompactChunkElems = 128 * kQ8BlockElems;  // elements per pool task

// The compact state slots of one ElementwiseSlice (its `state` pointers are ignored).
struct CompactSlots {
  CompactState slot[2];
};

// elementwise_step (same rules, same errors) with states[i] holding slices[i]'s moments. Throws
// ConfigError when the spans differ in size, a needed slot is not compact or has null storage.
StepResult elementwise_step_compact(const OptimizerParams& params, std::span<const ElementwiseSlice> slices,
                                    std::span<const CompactSlots> states, float lr, int64_t step,
                                    FiniteCheck check = FiniteCheck::kNone, const KernelOptions& exec = {});

// muon_step with the momentum in `momentum` (rows*cols elements); matrix.momentum must point at an
// fp32 scratch of rows*cols values (its contents are overwritten).
StepResult muon_step_compact(const OptimizerParams& params, const MuonMatrix& matrix, const CompactState& momentum,
                             float lr, MuonWorkspace& workspace, FiniteCheck check = FiniteCheck::kNone);

}  // namespace shardopt::optim
