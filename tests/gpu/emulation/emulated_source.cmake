# cmake -DIN=<kernels>.cu -DOUT=<file>.cc -P emulated_source.cmake
# A kernel source as host C++ for the emulation: device_shim.h included first, and each launch
# `kernel<<<grid, threads, 0, stream>>>(args);` (kernel possibly with template arguments)
# `emulated_launch(grid, threads, [&] { kernel(args); });` (a lambda: template arguments still deduced).
file(READ "${IN}" source)
set(source "// Generated from ${IN} by tests/gpu/emulation/emulated_source.cmake.\n#include \"tests/gpu/emulation/device_shim.h\"\n${source}")
string(REGEX REPLACE "([A-Za-z_0-9]+(<[^<>;]*>)?)<<<([^;>]+), ([^,;>]+), 0, stream>>>\\(([^;]*)\\);"
       "emulated_launch(\\3, \\4, [&] { \\1(\\5); });" source "${source}")
if(source MATCHES "<<<")
  message(FATAL_ERROR "emulated_source.cmake: a kernel launch of another form is left in ${IN}; "
                      "write it as kernel<...><<<grid, threads, 0, stream>>>(args); or extend this rule")
endif()
file(WRITE "${OUT}" "${source}")
