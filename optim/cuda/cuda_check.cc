#include "optim/cuda/cuda_check.h"

namespace shardopt::cuda {

void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw DeviceError(std::string("CUDA call ") + what + " failed at " + file + ":" + std::to_string(line) + ": " +
                  cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

void throw_cublas_error(cublasStatus_t status, const char* what, const char* file, int line) {
  throw DeviceError(std::string("cuBLAS call ") + what + " failed at " + file + ":" + std::to_string(line) + ": " +
                  cublasGetStatusName(status) + " (" + cublasGetStatusString(status) + ")");
}

int device_count() {
  int count = 0;  // cudaGetDeviceCount leaves it untouched on error (e.g. 35: no driver)
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

void upload_table(void** device, size_t* capacity_bytes, const void* host, size_t bytes) {
  if (bytes > *capacity_bytes) {
    if (*device != nullptr) SHARDOPT_CUDA_CHECK(cudaFree(*device));
    *device = nullptr;
    SHARDOPT_CUDA_CHECK(cudaMalloc(device, bytes));
    *capacity_bytes = bytes;
  }
  if (bytes > 0) SHARDOPT_CUDA_CHECK(cudaMemcpy(*device, host, bytes, cudaMemcpyHostToDevice));
}

}  // namespace shardopt::cuda
