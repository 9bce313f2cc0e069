# Project-wide warning and sanitizer flags, applied to C++ targets through shardopt_options.
add_library(shardopt_options INTERFACE)
target_compile_options(shardopt_options INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
# GCC 12 reports a false -Wrestrict on `"literal" + std::string` at -O2 (GCC bug 105329).
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  target_compile_options(shardopt_options INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Wno-restrict>)
endif()
if(SHARDOPT_WERROR)
  target_compile_options(shardopt_options INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
endif()

if(SHARDOPT_SANITIZE)
  if(NOT SHARDOPT_SANITIZE MATCHES "^(address|thread|undefined)$")
    message(FATAL_ERROR "SHARDOPT_SANITIZE must be address, thread or undefined, got '${SHARDOPT_SANITIZE}'")
  endif()
  target_compile_options(shardopt_options INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${SHARDOPT_SANITIZE} -fno-omit-frame-pointer -g>)
  target_link_options(shardopt_options INTERFACE -fsanitize=${SHARDOPT_SANITIZE})
endif()
