// A correction to SimGrid 3.32's SMPI, installed by replacing the process-wide pointer through
// which SMPI calls the broadcast its selector chose (colls::bcast). With
// smpi/privatization:0 every simulated rank shares it. The selector (smpi/coll-selector:ompi) still
// picks every algorithm.
//
// Communicator creation. SMPI gives every new communicator an id by broadcasting 4 bytes over it
//    (Comm::Comm), with the selected broadcast. For 4 bytes OpenMPI's rules pick the k-nomial tree at
//    16-31, 64-127 and >= 256 ranks, which SMPI implements as bcast__mvapich2_knomial_intra_node, and
//    that function first calls Comm::init_smp() on a communicator without a "leaders" communicator:
//    SMP-topology discovery with a ring all-gather over all N ranks and an all-reduce, N(N-1)
//    messages for every communicator created. The k-nomial tree never reads what init_smp computes
//    (it runs over the whole communicator), and no algorithm the ompi selector picks for shardopt's
//    step does. Measured (llama-1b, dim0, cpu-cluster.xml): creating the MPI backend's two
//    communicators over the world took 5.2 s at 256 ranks and 23.5 s at 512; at 1024 ranks the
//    set-up had not finished after 860 s. The wrapper makes the communicator its own leaders
//    communicator before the broadcast, so init_smp never runs; the broadcast's messages are
//    unchanged (same predictions to the nanosecond at 512 ranks). The extra reference keeps such
//    communicators alive until the process ends (a few objects each; step_sim creates a handful).
//
// (The engine's all-to-all no longer calls MPI_Alltoallv: the MPI backend runs its own point-to-point
// messages, comm/mpi_backend.cc SparseAllToAll, in both builds.)
//
// SimGrid's internal headers are not installed: like smpi_no_payload.cc this declares the few
// exported members it uses, checked against SimGrid 3.32 (Debian libsimgrid-dev); the build fails to
// link if the symbols change.
#include "sim/smpi_patches.h"

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

using BcastFn = decltype(simgrid::smpi::colls::bcast);
BcastFn selected_bcast = nullptr;  // what the selector installed (bcast__ompi)

int bcast_without_smp_discovery(void* buf, int count, MPI_Datatype datatype, int root, MPI_Comm comm) {
  simgrid::smpi::Comm* c = comm;
  if (c->get_leaders_comm() == nullptr) {
    c->ref();  // never released: the communicator outlives its MPI_Comm_free (see above)
    c->set_leaders_comm(c);
  }
  return selected_bcast(buf, count, datatype, root, comm);
}

}  // namespace

void install_smpi_patches() {
  if (selected_bcast != nullptr) return;
  selected_bcast = simgrid::smpi::colls::bcast;
  simgrid::smpi::colls::bcast = &bcast_without_smp_discovery;
}

}  // namespace shardopt::sim
