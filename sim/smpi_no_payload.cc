// SMPI executes the data side of every collective for real: its algorithms allocate temporaries of the
// message size per rank (new[]) and run the reduction operator on them, and it copies payloads that do
// not live in SMPI_SHARED_MALLOC blocks. With 1024 ranks of a 1B-parameter model in one process that is
// terabytes of memory traffic and tens of GiB of temporaries; step_sim needs only the timing.
// SMPI's own trace-replay mode skips exactly that work (temporaries become shared blocks, operators
// are not applied, copies are skipped); its switch, ActorExt::set_replaying, is exported by
// libsimgrid but its header is not installed, so the class is declared here with the two members used.
// Checked against SimGrid 3.32 (Debian libsimgrid-dev); the build fails to link if the symbols change.
#include "sim/smpi_no_payload.h"

#include <simgrid/s4u/Actor.hpp>
#include <xbt/Extendable.hpp>

namespace simgrid::smpi {
class ActorExt {
 public:
  static xbt::Extension<s4u::Actor, ActorExt> EXTENSION_ID;
  void set_replaying(bool value);
};
}  // namespace simgrid::smpi

namespace shardopt::sim {

namespace {
void set_replaying(bool value) {
  auto* ext = simgrid::s4u::Actor::self()->extension<simgrid::smpi::ActorExt>();
  if (ext != nullptr) ext->set_replaying(value);
}
}  // namespace

NoPayload::NoPayload() { set_replaying(true); }
NoPayload::~NoPayload() { set_replaying(false); }

}  // namespace shardopt::sim
