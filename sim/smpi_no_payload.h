// Tells SMPI not to touch message payloads for the calling simulated rank (see smpi_no_payload.cc).
#pragma once

namespace shardopt::sim {

// While a NoPayload lives on a rank (after MPI_Init), SMPI's collectives on that rank allocate their
// temporaries as shared blocks, apply no reduction operator and copy nothing: only the simulated
// time of the messages is computed. Only for collectives whose results are not read: MPI's own
// bookkeeping (MPI_Comm_split, MPI_Comm_dup) and small results the program uses need the payload.
class NoPayload {
 public:
  NoPayload();
  ~NoPayload();
  NoPayload(const NoPayload&) = delete;
  NoPayload& operator=(const NoPayload&) = delete;
};

}  // namespace shardopt::sim
