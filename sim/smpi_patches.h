// A correction to SimGrid 3.32's SMPI that keeps a 1000+-rank simulation's set-up from sending
// N(N-1) messages per communicator (see smpi_patches.cc).
#pragma once

namespace shardopt::sim {

// Call on every simulated rank after MPI_Init and before the first communicator is created
// (idempotent; with smpi/privatization:0 the first call installs them for every rank):
// broadcasts never run SMPI's SMP-topology discovery (N(N-1) messages per new communicator).
// The collective selector still picks every algorithm (smpi/coll-selector:ompi).
void install_smpi_patches();

}  // namespace shardopt::sim
