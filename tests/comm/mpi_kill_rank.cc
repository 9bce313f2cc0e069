// Fault injection under mpirun: every rank runs all_reduces; rank 1 _exit()s in the middle of the
// third one. The job must end with a non-zero status in bounded time (mpirun's default kills the
// others; failing that, the 20 s timeout raises TimeoutError on the survivors).
#include <unistd.h>

#include <cstdio>
#include <vector>

#include "base/error.h"
#include "comm/mpi_backend.h"

int main(int argc, char** argv) {
  using namespace shardopt::comm;
  MpiRuntime mpi(&argc, &argv);
  CommOptions options;
  options.checked = true;
  options.timeout = std::chrono::seconds(20);
  auto comm = mpi.world(options);
  std::vector<float> send(1 << 16, 1.0f), recv(1 << 16);
  try {
    for (int step = 0; step < 5; ++step) {
      auto work = comm->all_reduce(send.data(), recv.data(), send.size(), shardopt::DType::kF32, ReduceOp::kSum);
      if (step == 2 && comm->rank() == 1) _exit(3);  // dies with the collective in flight
      work->wait();
    }
  } catch (const shardopt::Error& e) {
    std::fprintf(stderr, "rank %d: %s\n", comm->rank(), e.what());
    return 2;
  }
  std::fprintf(stderr, "rank %d: finished although rank 1 died\n", comm->rank());
  return 0;
}
