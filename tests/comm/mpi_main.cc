// main() for gtest binaries launched under mpirun: initializes MPI, prints the usual gtest output
// on rank 0 only (other ranks print just their failures, prefixed with the rank), and makes every
// rank exit non-zero when any rank failed.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "comm/mpi_backend.h"
#include "tests/common/mpi_failure_printer.h"

int main(int argc, char** argv) {
  shardopt::comm::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = mpi.world_rank();
  shardopt::test_fixture::quiet_gtest_on_other_ranks(rank);
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any_failed && !failed) std::fprintf(stderr, "comm MPI suite: another rank failed (see above)\n");
  return any_failed;
}
