// SMPI gives every new communicator an id by broadcasting 4 bytes over it (Comm::Comm, SimGrid 3.32),
// with the broadcast the collective selector picks. For a 4-byte broadcast OpenMPI's rules
// (smpi/coll-selector:ompi) pick the k-nomial tree at 16-31, 64-127 and >= 256 ranks, which SMPI
// implements as bcast__mvapich2_knomial_intra_node. That function first calls Comm::init_smp() on a
// communicator that has no "leaders" communicator yet: SMP-topology discovery with a ring all-gather
// over all N ranks, an all-reduce and per-rank arrays of N entries, i.e. N(N-1) messages for every
// communicator created. The k-nomial tree itself never reads what init_smp computes (it works on the
// whole communicator), and none of the algorithms the ompi selector picks for shardopt's step do.
// Measured (llama-1b, dim0, cpu-cluster.xml): creating the backend's two communicators over the
// world took 5.2 s at 256 ranks and 23.5 s at 512 (x4.5 for x2 ranks), and at 1024 ranks the set-up
// had not finished after 860 s.
//
// The fix: colls::bcast (SMPI's process-wide pointer to the selected broadcast, shared by every rank
// with privatization off) is replaced by a wrapper that gives the communicator itself as its leaders
// communicator before calling the selected broadcast, so init_smp never runs. The broadcast's
// algorithm and messages are unchanged. The extra reference keeps such communicators alive until the
// process ends (a few objects per communicator; step_sim creates a handful).
//
// SimGrid's internal headers are not installed: like smpi_no_payload.cc this declares the few exported
// members it uses, checked against SimGrid 3.32 (Debian libsimgrid-dev); the build fails to link if
// the symbols change.
#include "sim/smpi_comm_setup.h"

#include <mpi.h>

namespace simgrid::smpi {
class Comm {
 public:
  void ref();
  void set_leaders_comm(Comm* leaders);
  Comm* get_leaders_comm() const;
};
namespace colls {
extern int (*bcast)(void* buf, int count, MPI_Datatype datatype, int root, MPI_Comm comm);
}  // namespace colls
}  // namespace simgrid::smpi

namespace shardopt::sim {

namespace {

using BcastFn = int (*)(void*, int, MPI_Datatype, int, MPI_Comm);
BcastFn selected_bcast = nullptr;  // what the selector installed (bcast__ompi)

int bcast_without_smp_discovery(void* buf, int count, MPI_Datatype datatype, int root, MPI_Comm comm) {
  simgrid::smpi::Comm* c = comm;
  if (c->get_leaders_comm() == nullptr) {
    c->ref();  // released by nobody: the communicator outlives its MPI_Comm_free (see above)
    c->set_leaders_comm(c);
  }
  return selected_bcast(buf, count, datatype, root, comm);
}

}  // namespace

void skip_smp_discovery_in_bcast() {
  if (selected_bcast != nullptr) return;
  selected_bcast = simgrid::smpi::colls::bcast;
  simgrid::smpi::colls::bcast = &bcast_without_smp_discovery;
}

}  // namespace shardopt::sim
