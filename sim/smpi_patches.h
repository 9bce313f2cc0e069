// Corrections to SimGrid 3.32's SMPI that keep a 1000+-rank simulation at O(N^2) messages and make
// its collectives send what OpenMPI sends (see smpi_patches.cc).
#pragma once

namespace shardopt::sim {

// Call on every simulated rank after MPI_Init and before the first communicator is created
// (idempotent; with smpi/privatization:0 the first call installs them for every rank):
// - broadcasts never run SMPI's SMP-topology discovery (N(N-1) messages per new communicator);
// - MPI_Alltoallv, where OpenMPI's rules pick the basic linear algorithm, skips zero-count peers
//   as OpenMPI does, instead of sending N-1 messages of 0 bytes per rank.
// The collective selector still picks every algorithm (smpi/coll-selector:ompi).
void install_smpi_patches();

}  // namespace shardopt::sim
