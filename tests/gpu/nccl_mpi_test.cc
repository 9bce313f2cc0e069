// The MPI bootstrap of the NCCL backend: the unique id reaches every rank intact. Runs without a
// GPU (ncclGetUniqueId needs none); the communicator itself is built only where a GPU exists.
#include <mpi.h>
#include <nccl.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "comm/nccl_backend.h"
#include "tests/gpu/gpu_test_util.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int failures = 0;
  const ncclUniqueId id = shardopt::comm::nccl_unique_id_over_mpi(MPI_COMM_WORLD, size - 1);
  std::vector<char> all(sizeof(ncclUniqueId) * size_t(size));
  MPI_Allgather(&id, sizeof id, MPI_BYTE, all.data(), sizeof id, MPI_BYTE, MPI_COMM_WORLD);
  for (int r = 0; r < size; ++r)
    if (std::memcmp(all.data() + r * sizeof id, &id, sizeof id) != 0) {
      std::fprintf(stderr, "rank %d: unique id differs from rank %d's\n", rank, r);
      ++failures;
    }
  const ncclUniqueId second = shardopt::comm::nccl_unique_id_over_mpi(MPI_COMM_WORLD, 0);
  if (std::memcmp(&id, &second, sizeof id) == 0) {
    std::fprintf(stderr, "rank %d: two unique ids are identical\n", rank);
    ++failures;
  }
  if (shardopt::testing::cuda_devices() >= size) {
    auto comm = shardopt::comm::make_nccl_communicator_mpi(MPI_COMM_WORLD);
    shardopt::testing::DeviceBuffer<int32_t> buf(std::vector<int32_t>{rank + 1});
    comm->all_reduce(buf.get(), buf.get(), 1, shardopt::DType::kI32, shardopt::comm::ReduceOp::kSum)->wait();
    const int32_t expected = size * (size + 1) / 2;
    if (buf.download()[0] != expected) {
      std::fprintf(stderr, "rank %d: all_reduce gave %d, expected %d\n", rank, buf.download()[0], expected);
      ++failures;
    }
  } else if (rank == 0) {
    std::printf("nccl_mpi_test: fewer CUDA devices than ranks: communicator part skipped\n");
  }
  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) std::printf("nccl_mpi_test: %s\n", total == 0 ? "PASSED" : "FAILED");
  MPI_Finalize();
  return total == 0 ? 0 : 1;
}
