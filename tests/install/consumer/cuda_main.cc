// The installed package's CUDA component: an Engine in device memory (shardopt::runtime_cuda), the
// same AdamW step as main.cc on two threads ranks sharing GPU 0 (shardopt::comm_staged's device
// mover) and on an NCCL world of one (shardopt::comm_nccl), checked against the formula.
// Without a CUDA device it checks what it can: that linking shardopt::runtime_cuda registered the
// CUDA step backend, which then reports the missing device (an unregistered backend says instead that
// the program has no CUDA step backend).
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <string>
#include <vector>

#include "adamw_case.h"
#include "base/error.h"
#include "comm/cuda_buffer_mover.h"
#include "comm/nccl_backend.h"
#include "comm/thread_backend.h"
#include "runtime/engine.h"

namespace so = shardopt;

namespace {

// One AdamW step of this rank's engine in device memory; returns its parameters, read back.
std::vector<float> device_step(so::comm::Communicator& comm) {
  auto options = adamw_case::options();
  options.memory_space = so::runtime::MemorySpace::kCuda;
  so::runtime::Engine engine(comm, {adamw_case::spec()}, options);
  engine.set_params([&](size_t, float* dst) {  // dst: host memory, uploaded by the engine
    for (int i = 0; i < adamw_case::kN; ++i) dst[i] = static_cast<float>(adamw_case::value(i));
  });
  std::vector<float> g(adamw_case::kN), out(adamw_case::kN);
  for (int i = 0; i < adamw_case::kN; ++i) g[i] = static_cast<float>(adamw_case::grad_of(comm.rank(), i));
  if (cudaMemcpy(engine.grad(0), g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess)
    throw so::DeviceError("copying the gradient to the device failed");
  engine.grad_ready(0);
  engine.step();
  if (cudaMemcpy(out.data(), engine.param(0), out.size() * sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess)
    throw so::DeviceError("reading the parameters back failed");
  return out;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    try {
      so::comm::run_ranks(1, [&](so::comm::Communicator& comm) { device_step(comm); });
    } catch (const so::DeviceError& e) {
      if (std::string(e.what()).find("no CUDA device") != std::string::npos) {
        std::printf("consumer_cuda: no CUDA device; the CUDA step backend is registered and says so (%s)\n", e.what());
        return 0;
      }
      std::fprintf(stderr, "consumer_cuda: unexpected device error: %s\n", e.what());
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "consumer_cuda: %s\n", e.what());
      return 1;
    }
    std::fprintf(stderr, "consumer_cuda: an engine in device memory was built without a CUDA device\n");
    return 1;
  }

  constexpr int kWorld = 2;
  std::vector<std::vector<float>> threads_result(kWorld);
  so::comm::run_ranks(
      kWorld, [&](so::comm::Communicator& comm) { threads_result[comm.rank()] = device_step(comm); },
      so::comm::CommOptions{}, so::comm::cuda_buffer_mover(0));

  ncclUniqueId id;
  if (ncclGetUniqueId(&id) != ncclSuccess) {
    std::fprintf(stderr, "consumer_cuda: ncclGetUniqueId failed\n");
    return 1;
  }
  std::vector<std::vector<float>> nccl_result(1);
  {
    so::comm::NcclCommunicator comm(id, 0, 1, 0);
    nccl_result[0] = device_step(comm);
  }
  if (adamw_case::mismatches(threads_result, kWorld) + adamw_case::mismatches(nccl_result, 1) != 0) return 1;
  std::printf("consumer_cuda: AdamW steps in device memory match the formula (2 threads ranks on GPU 0, NCCL world of 1)\n");
  return 0;
}
