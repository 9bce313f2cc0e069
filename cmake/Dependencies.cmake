# Every dependency comes from the system (Debian packages, the CUDA toolkit install). Nothing is downloaded.
find_package(Threads REQUIRED)
find_package(MPI REQUIRED COMPONENTS CXX)
find_package(Protobuf REQUIRED)
set(BLA_VENDOR OpenBLAS)
find_package(BLAS REQUIRED)
find_path(OPENBLAS_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas openblas-pthread REQUIRED)
# oneDNN: bf16 matmul for the CPU Newton-Schulz (OpenBLAS 0.3.21 has no sbgemm; BLIS 0.9 has no
# bf16). OpenMP: oneDNN's threading, set to one thread inside ThreadPool tasks.
find_package(dnnl CONFIG REQUIRED)
find_package(OpenMP REQUIRED COMPONENTS CXX)
# CLI11: the shardopt CLI, the benchmarks and the simulation program (sim/).
if(SHARDOPT_BUILD_APPS OR SHARDOPT_SIMGRID)
  find_package(CLI11 CONFIG REQUIRED)
endif()
find_package(nlohmann_json CONFIG REQUIRED)
find_package(fmt CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)
if(SHARDOPT_BUILD_TESTS AND SHARDOPT_BUILD_APPS)
  find_package(GTest REQUIRED)
  include(GoogleTest)
  find_package(Eigen3 3.3 NO_MODULE REQUIRED)
endif()

# OpenBLAS as an imported target with its cblas.h include path.
add_library(shardopt_blas INTERFACE)
target_link_libraries(shardopt_blas INTERFACE ${BLAS_LIBRARIES})
target_include_directories(shardopt_blas INTERFACE ${OPENBLAS_CBLAS_INCLUDE_DIR})

# CUDA + NCCL: compiled whenever the toolkit is present, even without a GPU (tests skip at run time).
set(SHARDOPT_HAVE_CUDA OFF)
if(NOT SHARDOPT_CUDA STREQUAL "OFF")
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS})
    find_library(NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR})
    if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
      if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
        # Machine code for sm_80 (A100; also runs on sm_86/89: A10, L4, L40, RTX 30/40) and sm_90
        # (H100/H200), plus compute_90 PTX that newer GPUs compile at load time. The kernels need
        # sm_80 (bf16). One architecture only: -DCMAKE_CUDA_ARCHITECTURES=90 (or native).
        set(CMAKE_CUDA_ARCHITECTURES "80-real;90")
      endif()
      if(NOT DEFINED CMAKE_CUDA_COMPILER)
        set(CMAKE_CUDA_COMPILER ${CUDAToolkit_NVCC_EXECUTABLE})
      endif()
      enable_language(CUDA)
      # CMake 3.25 knows no CUDA C++20 dialect for nvcc: .cu files are C++17 (host code stays C++20).
      set(CMAKE_CUDA_STANDARD 17)
      set(CMAKE_CUDA_STANDARD_REQUIRED ON)
      add_library(shardopt_nccl INTERFACE)
      target_include_directories(shardopt_nccl INTERFACE ${NCCL_INCLUDE_DIR})
      target_link_libraries(shardopt_nccl INTERFACE ${NCCL_LIBRARY} CUDA::cudart)
      get_filename_component(SHARDOPT_NCCL_LIBRARY_DIR ${NCCL_LIBRARY} DIRECTORY)  # a hint for the installed config
      set(SHARDOPT_HAVE_CUDA ON)
    endif()
  endif()
  if(SHARDOPT_CUDA STREQUAL "ON" AND NOT SHARDOPT_HAVE_CUDA)
    message(FATAL_ERROR "SHARDOPT_CUDA=ON but the CUDA toolkit or NCCL was not found")
  endif()
endif()

# mpirun settings for tests: quiet and reliable on one host over loopback/shared memory.
set(SHARDOPT_MPIEXEC ${MPIEXEC_EXECUTABLE})
set(SHARDOPT_MPIEXEC_FLAGS --oversubscribe --mca btl self,vader --mca btl_vader_single_copy_mechanism none
    --mca rmaps_base_oversubscribe 1 --bind-to none)
