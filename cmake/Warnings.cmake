# Project-wide warning and sanitizer flags, applied to C++ targets through shardopt_options.
add_library(shardopt_options INTERFACE)
target_compile_options(shardopt_options INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
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
