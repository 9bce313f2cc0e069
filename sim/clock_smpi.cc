// THE clock (base/clock.h) for the SimGrid build: MPI_Wtime, which under SMPI reads the simulated
// time of the calling rank. Linked into the simulation program instead of base/clock.cc, so base/
// itself never depends on MPI.
#include <mpi.h>

#include <chrono>

#include "base/clock.h"

namespace shardopt::clock {

TimePoint now() {
  const std::chrono::duration<double> since_start(MPI_Wtime());
  return TimePoint(std::chrono::duration_cast<Source::duration>(since_start));
}

double seconds_since(TimePoint start) { return std::chrono::duration<double>(now() - start).count(); }

double now_seconds() { return MPI_Wtime(); }

}  // namespace shardopt::clock
