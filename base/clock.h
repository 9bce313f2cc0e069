// THE clock of shardopt: every timer in the library, the training job and the benchmarks reads time
// through these functions and nothing else. Keeping one time source lets a build choose another
// implementation (e.g. SimGrid's MPI_Wtime under SMPI, which advances simulated time) in clock.cc
// without touching any caller. Values are seconds of a monotonic clock; only differences mean anything.
#pragma once

#include <chrono>

namespace shardopt::clock {

using Source = std::chrono::steady_clock;
using TimePoint = Source::time_point;

TimePoint now();
// Seconds elapsed from `start` to now().
double seconds_since(TimePoint start);
// now() as seconds from the clock's (arbitrary) epoch, for code that keeps plain doubles.
double now_seconds();

}  // namespace shardopt::clock
