// Optimizer steps over compact (bf16 or q8, optim/quant8.h) moment storage.
//
// Element-wise (AdamW, Lion, SGD momentum), q8: one pass over memory per q8 block, in one function
// compiled per instruction set: each element's state is decoded from its code inside the update
// loop, the update is the fp32 one (the per-element functions elementwise_step uses; in the AVX2 and
// AVX-512 builds the same operations in intrinsics, optim/compact_step.cc), the new state
// waits in an L1 scratch while the loop keeps the block's new absmax, then the block is encoded
// (float8; AdamW's v in the unsigned sqrt-domain code, from the sqrt(v) the update computed). The
// result is bit for bit decode + elementwise_step + q8_quantize (tests/optim/compact_step_test.cc).
// The AVX-512 and AVX2 builds write each full AdamW block's codes during the next block's update
// loop, where the encode's integer work overlaps the divisions and square roots (same result).
// bf16: tiles of 2048 elements are decoded to an L1 scratch, updated by the fp32 loops, re-encoded.
// Muon / NorMuon: the momentum is decoded into matrix.momentum (an fp32 scratch of the matrix's
// size), muon_step runs, and the new momentum is encoded back (load_compact / store_compact: tasks
// of kCompactChunkElems, whole q8 blocks, on exec.pool). NorMuon's row moment stays fp32.
//
// Element-wise tasks of kCompactChunkElems run on exec.pool (each is independent: same result at any
// pool size); the loops run the widest instruction-set build exec allows and the CPU has (AVX-512,
// AVX2 + FMA or portable; optim/kernel_options.h).
#pragma once

#include <cstdint>
#include <span>

#include "optim/elementwise.h"
#include "optim/muon.h"
#include "optim/quant8.h"

namespace shardopt::optim {

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
// fp32 scratch of rows*cols values (its contents are overwritten). exec parallelizes the momentum's
// decode and encode only (same result at any pool size); muon_step itself runs as it does without
// compact state (its products use the BLAS threads as configured). Give exec.pool when the caller
// runs its matrices one after another, as the Engine does for compact momentum (the matrices share
// one scratch): the pool is idle then. A call from inside a task of exec.pool runs the decode and
// encode on that task's thread (ThreadPool runs nested parallel_for inline), so a caller running
// matrices concurrently on the pool cannot oversubscribe it through exec. Allocates nothing.
StepResult muon_step_compact(const OptimizerParams& params, const MuonMatrix& matrix, const CompactState& momentum,
                             float lr, MuonWorkspace& workspace, FiniteCheck check = FiniteCheck::kNone,
                             const KernelOptions& exec = {});

}  // namespace shardopt::optim
