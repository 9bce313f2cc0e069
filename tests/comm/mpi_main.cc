// main() for the comm MPI suite under mpirun (tests/common/mpi_suite_main.h).
#include "tests/common/mpi_suite_main.h"

int main(int argc, char** argv) { return shardopt::test_fixture::run_mpi_suite(argc, argv, "comm MPI suite"); }
