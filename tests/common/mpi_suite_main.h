// The body of main() for gtest binaries launched under mpirun: initializes MPI, prints the usual
// gtest output on rank 0 only (other ranks print just their failures, tagged with the rank), and
// makes every rank exit non-zero when any rank failed. Suites whose tests share one world
// communicator pass `world_slot`: it points at a world built with `options` while the tests run.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "comm/mpi_backend.h"
#include "tests/common/mpi_failure_printer.h"

namespace shardopt::test_fixture {

inline int run_mpi_suite(int argc, char** argv, const char* suite, comm::CommOptions options = {},
                         comm::Communicator** world_slot = nullptr) {
  comm::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = mpi.world_rank();
  quiet_gtest_on_other_ranks(rank);
  int failed = 0;
  if (world_slot != nullptr) {
    auto world = mpi.world(options);
    *world_slot = world.get();
    failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
    *world_slot = nullptr;
  } else {
    failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  }
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any_failed && !failed) std::fprintf(stderr, "%s: another rank failed (see above)\n", suite);
  return any_failed;
}

}  // namespace shardopt::test_fixture
