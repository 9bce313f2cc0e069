// Two corrections to SimGrid 3.32's SMPI, installed by replacing the process-wide pointers through
// which SMPI calls the collective its selector chose (colls::bcast, colls::alltoallv). With
// smpi/privatization:0 every simulated rank shares them. The selector (smpi/coll-selector:ompi) still
// picks every algorithm.
//
// 1. Communicator creation. SMPI gives every new communicator an id by broadcasting 4 bytes over it
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
// 2. MPI_Alltoallv, basic linear. OpenMPI's rules pick it at 4-63, 128-255 and >= 1024 ranks; OpenMPI
//    (ompi_coll_base_alltoallv_intra_basic_linear) posts a receive and a send only for peers with a
//    nonzero count. SMPI's port (alltoallv__ompi_basic_linear) posts all 2(N-1), zero-byte messages
//    included, and waits for them with Request::waitall, whose cost per completion grows with the
//    number of pending requests. shardopt's dim0 exchange sends each rank's rows of a Muon matrix
//    to that matrix's owner only: at 1024 ranks of llama-1b a rank has 154 owners to send to, so
//    ~85% of those messages are empty, and the first exchange had not finished after 7.5 minutes.
//    The wrapper runs OpenMPI's version where the rules pick basic linear, and SMPI's selection
//    (pairwise) elsewhere.
//
// SimGrid's internal headers are not installed: like smpi_no_payload.cc this declares the few
// exported members it uses, checked against SimGrid 3.32 (Debian libsimgrid-dev); the build fails to
// link if the symbols change.
#include "sim/smpi_patches.h"

#include <mpi.h>

#include <vector>

namespace simgrid::smpi {
class Comm {
 public:
  void ref();
  void set_leaders_comm(Comm* leaders);
  Comm* get_leaders_comm() const;
  int rank() const;
  int size() const;
};
class Datatype {
 public:
  static int copy(const void* sendbuf, int sendcount, Datatype* sendtype, void* recvbuf, int recvcount,
                  Datatype* recvtype);
  int extent(MPI_Aint* lb, MPI_Aint* extent) const;
};
class Request {
 public:
  static Request* isend_init(const void* buf, int count, Datatype* datatype, int dst, int tag, Comm* comm);
  static Request* irecv_init(void* buf, int count, Datatype* datatype, int src, int tag, Comm* comm);
  static void startall(int count, Request** requests);
  static int waitall(int count, Request** requests, MPI_Status* status);
  static void unref(Request** request);
};
namespace colls {
extern int (*bcast)(void* buf, int count, MPI_Datatype datatype, int root, MPI_Comm comm);
extern int (*alltoallv)(const void* send_buff, const int* send_counts, const int* send_disps, MPI_Datatype send_type,
                        void* recv_buff, const int* recv_counts, const int* recv_disps, MPI_Datatype recv_type,
                        MPI_Comm comm);
}  // namespace colls
}  // namespace simgrid::smpi

namespace shardopt::sim {

namespace {

using BcastFn = decltype(simgrid::smpi::colls::bcast);
using AlltoallvFn = decltype(simgrid::smpi::colls::alltoallv);
BcastFn selected_bcast = nullptr;          // what the selector installed (bcast__ompi)
AlltoallvFn selected_alltoallv = nullptr;  // alltoallv__ompi

constexpr int kCollTagAlltoallv = -1000;  // SMPI's COLL_TAG_ALLTOALLV (src/smpi/include/private.hpp)

int bcast_without_smp_discovery(void* buf, int count, MPI_Datatype datatype, int root, MPI_Comm comm) {
  simgrid::smpi::Comm* c = comm;
  if (c->get_leaders_comm() == nullptr) {
    c->ref();  // never released: the communicator outlives its MPI_Comm_free (see above)
    c->set_leaders_comm(c);
  }
  return selected_bcast(buf, count, datatype, root, comm);
}

// OpenMPI's choice for MPI_Alltoallv (coll_tuned_decision_fixed.c; SMPI's alltoallv__ompi has the same
// table): basic linear, except pairwise below 4 ranks, at 64-127 and at 256-1023.
bool ompi_picks_basic_linear(int ranks) {
  if (ranks < 4) return false;
  if (ranks < 64) return true;
  if (ranks < 128) return false;
  if (ranks < 256) return true;
  return ranks >= 1024;
}

// ompi_coll_base_alltoallv_intra_basic_linear: a receive from and a send to every peer with a nonzero
// count, all started at once.
int alltoallv_basic_linear_ompi(const void* sbuf, const int* scounts, const int* sdisps, MPI_Datatype sdtype,
                                void* rbuf, const int* rcounts, const int* rdisps, MPI_Datatype rdtype,
                                MPI_Comm comm) {
  const int size = comm->size(), rank = comm->rank();
  MPI_Aint lb = 0, sext = 0, rext = 0;
  sdtype->extent(&lb, &sext);
  rdtype->extent(&lb, &rext);
  if (scounts[rank] != 0)
    simgrid::smpi::Datatype::copy(static_cast<const char*>(sbuf) + sdisps[rank] * sext, scounts[rank], sdtype,
                                  static_cast<char*>(rbuf) + rdisps[rank] * rext, rcounts[rank], rdtype);
  if (size == 1) return MPI_SUCCESS;
  std::vector<MPI_Request> reqs;
  for (int i = 0; i < size; ++i)
    if (i != rank && rcounts[i] != 0)
      reqs.push_back(simgrid::smpi::Request::irecv_init(static_cast<char*>(rbuf) + rdisps[i] * rext, rcounts[i],
                                                        rdtype, i, kCollTagAlltoallv, comm));
  for (int i = 0; i < size; ++i)
    if (i != rank && scounts[i] != 0)
      reqs.push_back(simgrid::smpi::Request::isend_init(static_cast<const char*>(sbuf) + sdisps[i] * sext,
                                                        scounts[i], sdtype, i, kCollTagAlltoallv, comm));
  const int n = static_cast<int>(reqs.size());
  simgrid::smpi::Request::startall(n, reqs.data());
  simgrid::smpi::Request::waitall(n, reqs.data(), MPI_STATUSES_IGNORE);
  for (auto& r : reqs)
    if (r != MPI_REQUEST_NULL) simgrid::smpi::Request::unref(&r);
  return MPI_SUCCESS;
}

int alltoallv_ompi_rules(const void* sbuf, const int* scounts, const int* sdisps, MPI_Datatype sdtype, void* rbuf,
                         const int* rcounts, const int* rdisps, MPI_Datatype rdtype, MPI_Comm comm) {
  if (ompi_picks_basic_linear(comm->size()))
    return alltoallv_basic_linear_ompi(sbuf, scounts, sdisps, sdtype, rbuf, rcounts, rdisps, rdtype, comm);
  return selected_alltoallv(sbuf, scounts, sdisps, sdtype, rbuf, rcounts, rdisps, rdtype, comm);
}

}  // namespace

void install_smpi_patches() {
  if (selected_bcast != nullptr) return;
  selected_bcast = simgrid::smpi::colls::bcast;
  simgrid::smpi::colls::bcast = &bcast_without_smp_discovery;
  selected_alltoallv = simgrid::smpi::colls::alltoallv;
  simgrid::smpi::colls::alltoallv = &alltoallv_ompi_rules;
}

}  // namespace shardopt::sim
