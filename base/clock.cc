#include "base/clock.h"

namespace shardopt::clock {

TimePoint now() { return Source::now(); }

double seconds_since(TimePoint start) { return std::chrono::duration<double>(now() - start).count(); }

double now_seconds() { return std::chrono::duration<double>(now().time_since_epoch()).count(); }

}  // namespace shardopt::clock
