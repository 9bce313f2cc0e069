# The installed shardopt package: cmake --install <build> --prefix <p> gives
#   <p>/include/shardopt/<layer>/*.h         headers, included as "runtime/engine.h" (and the generated
#                                            "proto/*.pb.h")
#   <p>/lib/libshardopt_*.a                  the libraries
#   <p>/lib/cmake/shardopt/                  shardoptConfig.cmake, its version file and exported targets
# A trainer writes find_package(shardopt) and target_link_libraries(app shardopt::runtime); the
# config file finds the libraries' own dependencies (protobuf, OpenBLAS, MPI, fmt, nlohmann_json).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(SHARDOPT_INSTALL_INCLUDEDIR ${CMAKE_INSTALL_INCLUDEDIR}/shardopt)
set(SHARDOPT_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/shardopt)

# Exported as shardopt::<name>: shardopt_runtime -> shardopt::runtime.
set(SHARDOPT_EXPORTED_LIBRARIES
  shardopt_options shardopt_blas shardopt_base shardopt_proto shardopt_comm shardopt_comm_mpi
  shardopt_optim shardopt_sharding shardopt_model shardopt_checkpoint shardopt_runtime shardopt_gossip)
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

install(TARGETS ${SHARDOPT_EXPORTED_LIBRARIES} EXPORT shardoptTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(EXPORT shardoptTargets NAMESPACE shardopt:: DESTINATION ${SHARDOPT_INSTALL_CMAKEDIR})

foreach(layer base comm optim sharding model checkpoint runtime)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${layer}/ DESTINATION ${SHARDOPT_INSTALL_INCLUDEDIR}/${layer}
    FILES_MATCHING PATTERN "*.h" PATTERN "cuda" EXCLUDE)
endforeach()
install(FILES ${PROJECT_SOURCE_DIR}/proto/dtype_convert.h DESTINATION ${SHARDOPT_INSTALL_INCLUDEDIR}/proto)
install(DIRECTORY ${PROJECT_BINARY_DIR}/proto/ DESTINATION ${SHARDOPT_INSTALL_INCLUDEDIR}/proto
  FILES_MATCHING PATTERN "*.pb.h" PATTERN "CMakeFiles" EXCLUDE)

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/shardoptConfig.cmake.in
  ${PROJECT_BINARY_DIR}/shardoptConfig.cmake INSTALL_DESTINATION ${SHARDOPT_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/shardoptConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/shardoptConfig.cmake ${PROJECT_BINARY_DIR}/shardoptConfigVersion.cmake
  DESTINATION ${SHARDOPT_INSTALL_CMAKEDIR})
