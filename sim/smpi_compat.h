// Force-included after SMPI's smpi_helpers.h in the SimGrid build (sim/CMakeLists.txt): that header
// defines exit(x) as a macro, which breaks member functions named exit (CLI11's App::exit). Simulated
// ranks that call exit still end the whole simulation, which is what a failure should do.
#pragma once
#undef exit
