// CUDA / cuBLAS error checks shared by the GPU code: a failed call becomes a DeviceError
// (base/error.h) naming the call, the error string and the source location. Also the device
// count and the upload of the kernels' chunk tables.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "base/error.h"

namespace shardopt::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* what, const char* file, int line);

// Number of usable CUDA devices; 0 when the driver is missing or reports an error (no GPU).
int device_count();

// Copies `bytes` of host data to *device (blocking), first replacing *device by a larger cudaMalloc
// when *capacity_bytes is too small: the chunk tables the optimizers build on the host and upload.
void upload_table(void** device, size_t* capacity_bytes, const void* host, size_t bytes);

}  // namespace shardopt::cuda

#define SHARDOPT_CUDA_CHECK(call)                                                           \
  do {                                                                                      \
    cudaError_t shardopt_err_ = (call);                                                     \
    if (shardopt_err_ != cudaSuccess)                                                       \
      ::shardopt::cuda::throw_cuda_error(shardopt_err_, #call, __FILE__, __LINE__);         \
  } while (0)

#define SHARDOPT_CUBLAS_CHECK(call)                                                         \
  do {                                                                                      \
    cublasStatus_t shardopt_status_ = (call);                                               \
    if (shardopt_status_ != CUBLAS_STATUS_SUCCESS)                                          \
      ::shardopt::cuda::throw_cublas_error(shardopt_status_, #call, __FILE__, __LINE__);    \
  } while (0)

// After a kernel launch: reports launch-configuration errors at once.
#define SHARDOPT_CUDA_CHECK_LAUNCH() SHARDOPT_CUDA_CHECK(cudaGetLastError())
