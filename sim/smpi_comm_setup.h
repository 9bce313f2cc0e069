// Keeps SMPI's communicator creation O(N) messages (see smpi_comm_setup.cc).
#pragma once

namespace shardopt::sim {

// Call once per simulated rank after MPI_Init and before the first communicator is created
// (idempotent; with smpi/privatization:0 the first call installs it for every rank). From then on
// SMPI's broadcasts never run its SMP-topology discovery; the algorithms and messages of every
// broadcast stay those the collective selector picks.
void skip_smp_discovery_in_bcast();

}  // namespace shardopt::sim
