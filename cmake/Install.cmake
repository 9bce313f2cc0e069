# The installed shardopt package: cmake --install <build> --prefix <p> gives
#   <p>/include/shardopt/<layer>/*.h         headers, included as "runtime/engine.h" (and the generated
#                                            "proto/*.pb.h")
#   <p>/lib/libshardopt_*.a                  the libraries
#   <p>/lib/cmake/shardopt/                  shardoptConfig.cmake, its version file and exported targets
# A trainer writes find_package(shardopt) and target_link_libraries(app shardopt::runtime); the
# config file finds the libraries' own dependencies (protobuf, OpenBLAS, MPI, fmt, nlohmann_json).
# Built with CUDA, the package has the component `cuda` too (find_package(shardopt COMPONENTS cuda)):
#   shardopt::runtime_cuda   the CUDA step backend (EngineOptions::memory_space = kCuda); an object
#                            library, so linking it registers the backend, as in the build tree
#   shardopt::comm_nccl      NcclCommunicator (one GPU per rank)
#   shardopt::comm_staged    threads ranks sharing a GPU (cuda_buffer_mover), HostStagedCommunicator
#   shardopt::optim_cuda     the kernels (element-wise, compact state, Newton-Schulz, Muon)
# with their headers (runtime/cuda/, optim/cuda/), the CUDA toolkit and NCCL found again by the config.
# All of this is the install component `development` (cmake --install B --component development: the
# package without the CLI and its data).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(SHARDOPT_INSTALL_INCLUDEDIR ${CMAKE_INSTALL_INCLUDEDIR}/shardopt)
set(SHARDOPT_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/shardopt)

# Exported as shardopt::<name>: shardopt_runtime -> shardopt::runtime.
set(SHARDOPT_EXPORTED_LIBRARIES
  shardopt_options shardopt_blas shardopt_base shardopt_proto shardopt_comm shardopt_comm_mpi
  shardopt_optim shardopt_sharding shardopt_model shardopt_checkpoint shardopt_runtime shardopt_gossip)
if(SHARDOPT_HAVE_CUDA)
  list(APPEND SHARDOPT_EXPORTED_LIBRARIES shardopt_optim_cuda shardopt_comm_nccl shardopt_comm_staged
    shardopt_runtime_cuda)
endif()
foreach(lib ${SHARDOPT_EXPORTED_LIBRARIES})
  string(REGEX REPLACE "^shardopt_" "" exported_name ${lib})
  set_target_properties(${lib} PROPERTIES EXPORT_NAME ${exported_name})
  get_target_property(lib_type ${lib} TYPE)
  if(lib_type STREQUAL "INTERFACE_LIBRARY")
    continue()
  endif()
  # In the build tree headers come from the global include path; installed ones from here.
  target_include_directories(${lib} INTERFACE $<INSTALL_INTERFACE:${SHARDOPT_INSTALL_INCLUDEDIR}>)
endforeach()

install(TARGETS ${SHARDOPT_EXPORTED_LIBRARIES} EXPORT shardoptTargets COMPONENT development
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  OBJECTS DESTINATION ${CMAKE_INSTALL_LIBDIR}/shardopt/objects)
install(EXPORT shardoptTargets NAMESPACE shardopt:: DESTINATION ${SHARDOPT_INSTALL_CMAKEDIR} COMPONENT development)

# The cuda/ header folders only where their libraries are installed.
set(cuda_headers PATTERN "cuda" EXCLUDE)
if(SHARDOPT_HAVE_CUDA)
  set(cuda_headers "")
endif()
foreach(layer base comm optim sharding model checkpoint runtime)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${layer}/ DESTINATION ${SHARDOPT_INSTALL_INCLUDEDIR}/${layer}
    COMPONENT development FILES_MATCHING PATTERN "*.h" ${cuda_headers})
endforeach()
install(FILES ${PROJECT_SOURCE_DIR}/proto/dtype_convert.h DESTINATION ${SHARDOPT_INSTALL_INCLUDEDIR}/proto
  COMPONENT development)
install(DIRECTORY ${PROJECT_BINARY_DIR}/proto/ DESTINATION ${SHARDOPT_INSTALL_INCLUDEDIR}/proto
  COMPONENT development FILES_MATCHING PATTERN "*.pb.h" PATTERN "CMakeFiles" EXCLUDE)

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/shardoptConfig.cmake.in
  ${PROJECT_BINARY_DIR}/shardoptConfig.cmake INSTALL_DESTINATION ${SHARDOPT_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/shardoptConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/shardoptConfig.cmake ${PROJECT_BINARY_DIR}/shardoptConfigVersion.cmake
  DESTINATION ${SHARDOPT_INSTALL_CMAKEDIR} COMPONENT development)
