# The Python extension shardopt._C (python/). ON requires Python and nanobind; AUTO builds it when
# both are found (scripts/test points Python_EXECUTABLE at the project venv). `pip install .` sets
# SHARDOPT_PYTHON=ON through pyproject.toml.
set(SHARDOPT_HAVE_PYTHON OFF)
if(NOT SHARDOPT_PYTHON STREQUAL "OFF")
  find_package(Python 3.9 COMPONENTS Interpreter Development.Module QUIET)
  if(Python_FOUND)
    execute_process(COMMAND ${Python_EXECUTABLE} -m nanobind --cmake_dir
      OUTPUT_VARIABLE nanobind_ROOT OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE nanobind_rc)
    if(nanobind_rc EQUAL 0 AND nanobind_ROOT)
      find_package(nanobind CONFIG QUIET)
      set(SHARDOPT_HAVE_PYTHON ${nanobind_FOUND})
    endif()
  endif()
  if(SHARDOPT_PYTHON STREQUAL "ON" AND NOT SHARDOPT_HAVE_PYTHON)
    message(FATAL_ERROR "SHARDOPT_PYTHON=ON but Python (with its development headers) or nanobind was not found")
  endif()
endif()
if(SHARDOPT_HAVE_PYTHON)
  add_subdirectory(python)
endif()
message(STATUS "shardopt: Python extension ${SHARDOPT_HAVE_PYTHON} (${Python_EXECUTABLE})")
