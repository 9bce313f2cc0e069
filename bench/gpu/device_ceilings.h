// Memory-bandwidth ceilings of the current CUDA device, measured in the benchmark's own run, for the
// element-wise optimizer figures. A plain device-to-device copy understates what an optimizer update
// can reach (it is one read stream and one write stream); the in-place read-modify-write stream below
// moves exactly AdamW's bytes (reads param, grad, m, v; writes param, m, v, all fp32) with trivial
// arithmetic, so "fraction of the RMW ceiling" says how close a kernel is to the memory system.
#pragma once

#include <cstddef>
#include <functional>

namespace shardopt::bench {

// Median seconds of `reps` runs of fn (at least one) after `warmup` untimed runs, each run timed with
// CUDA events on the default stream: the timer of every GPU benchmark here.
double median_event_seconds(const std::function<void()>& fn, int warmup, int reps);

struct DeviceBandwidth {
  double seconds = 0;          // best (median over repetitions) of the launch configurations tried
  double gbytes_per_s = 0;     // counted bytes (read + written) per second
  double bytes = 0;            // bytes counted per pass
};

// cudaMemcpy device to device of `bytes`, counting bytes read + written.
DeviceBandwidth device_copy_bandwidth(size_t bytes, int reps);

// The AdamW-shaped in-place stream over `elements` fp32 values per array (28 bytes per element),
// best over several grid sizes (it is a ceiling: the best this harness can do).
DeviceBandwidth device_rmw_bandwidth(size_t elements, int reps);

}  // namespace shardopt::bench
