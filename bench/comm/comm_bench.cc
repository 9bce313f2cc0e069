// comm_bench: algorithm bandwidth of the shardopt communication backends.
//
// Under mpirun: for each collective and message size, the shardopt MPI backend (unchecked mode, the
// production setting) and the raw MPI call it wraps (the same nonblocking call + MPI_Wait, on the
// same buffers, in the same run), plus the blocking MPI call for reference. The backend's
// reduce-scatter is its own point-to-point schedule (comm/halving_schedule.h); its raw figures are
// MPI_Ireduce_scatter and MPI_Reduce_scatter, what it would otherwise call. Then, on rank 0 alone
// while the other processes sleep, the threads backend with the same number of ranks, compared
// with memcpy bandwidth measured in the same run.
//
// "bytes" is the full per-rank buffer B: all_reduce and broadcast move B; reduce_scatter reduces a
// B send buffer to B/N per rank; all_gather gathers B/N per rank into B; all_to_all sends B per rank
// (B/N to each peer). Algorithm bandwidth = B / seconds. Every figure is the best of --repeat runs,
// each the slowest rank's mean over the iterations.
#include <mpi.h>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "bench/common/bench_util.h"
#include "comm/mpi_backend.h"
#include "comm/thread_backend.h"

namespace {

using namespace shardopt;
using namespace shardopt::comm;
using bench::Clock;

double now_s() { return clock::now_seconds(); }

struct Buffers {
  std::vector<float> send, recv;
  std::vector<size_t> counts, send_counts, recv_counts;
  std::vector<int> icounts, idispls;
};

Buffers make_buffers(size_t bytes, int world, int rank) {
  Buffers b;
  const size_t elems = std::max<size_t>(1, bytes / 4);
  b.send.assign(elems, 1.0f + static_cast<float>(rank));
  b.recv.assign(elems, 0.0f);
  b.counts.assign(world, elems / world);
  b.counts[world - 1] += elems % world;
  b.send_counts = b.counts;
  b.recv_counts = b.counts;
  b.icounts.resize(world);
  b.idispls.resize(world);
  for (int r = 0, off = 0; r < world; ++r) {
    b.icounts[r] = static_cast<int>(b.counts[r]);
    b.idispls[r] = off;
    off += b.icounts[r];
  }
  return b;
}

// One iteration of `collective` through a shardopt communicator.
void shardopt_op(Communicator& c, const std::string& collective, Buffers& b) {
  const int me = c.rank();
  const size_t n = b.send.size();
  WorkPtr w;
  if (collective == "all_reduce") w = c.all_reduce(b.send.data(), b.recv.data(), n, DType::kF32, ReduceOp::kSum);
  if (collective == "reduce_scatter")
    w = c.reduce_scatter(b.send.data(), b.recv.data(), b.counts, DType::kF32, ReduceOp::kSum);
  if (collective == "all_gather") {
    size_t off = 0;
    for (int r = 0; r < me; ++r) off += b.counts[r];
    w = c.all_gather(b.send.data() + off, b.recv.data(), b.counts, DType::kF32);
  }
  if (collective == "all_to_all") w = c.all_to_all(b.send.data(), b.send_counts, b.recv.data(), b.recv_counts, DType::kF32);
  if (collective == "broadcast") w = c.broadcast(b.recv.data(), n, DType::kF32, 0);
  w->wait();
}

// The same through raw MPI: the nonblocking call shardopt uses, or the blocking one.
void raw_op(MPI_Comm comm, const std::string& collective, Buffers& b, bool blocking) {
  int me = 0;
  MPI_Comm_rank(comm, &me);
  const int n = static_cast<int>(b.send.size());
  MPI_Request req = MPI_REQUEST_NULL;
  float* s = b.send.data();
  float* r = b.recv.data();
  if (collective == "all_reduce") {
    if (blocking) MPI_Allreduce(s, r, n, MPI_FLOAT, MPI_SUM, comm);
    else MPI_Iallreduce(s, r, n, MPI_FLOAT, MPI_SUM, comm, &req);
  } else if (collective == "reduce_scatter") {
    if (blocking) MPI_Reduce_scatter(s, r, b.icounts.data(), MPI_FLOAT, MPI_SUM, comm);
    else MPI_Ireduce_scatter(s, r, b.icounts.data(), MPI_FLOAT, MPI_SUM, comm, &req);
  } else if (collective == "all_gather") {
    float* mine = s + b.idispls[me];
    if (blocking) MPI_Allgatherv(mine, b.icounts[me], MPI_FLOAT, r, b.icounts.data(), b.idispls.data(), MPI_FLOAT, comm);
    else MPI_Iallgatherv(mine, b.icounts[me], MPI_FLOAT, r, b.icounts.data(), b.idispls.data(), MPI_FLOAT, comm, &req);
  } else if (collective == "all_to_all") {
    const int* c = b.icounts.data();
    const int* d = b.idispls.data();
    if (blocking) MPI_Alltoallv(s, c, d, MPI_FLOAT, r, c, d, MPI_FLOAT, comm);
    else MPI_Ialltoallv(s, c, d, MPI_FLOAT, r, c, d, MPI_FLOAT, comm, &req);
  } else if (collective == "broadcast") {
    if (blocking) MPI_Bcast(r, n, MPI_FLOAT, 0, comm);
    else MPI_Ibcast(r, n, MPI_FLOAT, 0, comm, &req);
  }
  if (!blocking) MPI_Wait(&req, MPI_STATUS_IGNORE);
}

int iterations_for(size_t bytes) { return static_cast<int>(std::clamp<size_t>((size_t{64} << 20) / bytes, 3, 50)); }

// Mean seconds per iteration of the slowest rank.
double time_mpi(MPI_Comm comm, int iters, const std::function<void()>& op) {
  op();  // warm-up
  MPI_Barrier(comm);
  const double t0 = now_s();
  for (int i = 0; i < iters; ++i) op();
  double mine = (now_s() - t0) / iters, slowest = 0;
  MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, comm);
  return slowest;
}

double time_threads(int ranks, const std::string& collective, size_t bytes, int iters) {
  std::vector<Buffers> bufs;
  for (int r = 0; r < ranks; ++r) bufs.push_back(make_buffers(bytes, ranks, r));
  double seconds = 0;
  run_ranks(ranks, [&](Communicator& c) {
    Buffers& b = bufs[c.rank()];
    for (int i = 0; i < 2; ++i) shardopt_op(c, collective, b);
    c.barrier()->wait();
    const double t0 = now_s();
    for (int i = 0; i < iters; ++i) shardopt_op(c, collective, b);
    c.barrier()->wait();
    if (c.rank() == 0) seconds = (now_s() - t0) / iters;
  });
  return seconds;
}

double time_memcpy(size_t bytes, int iters) {
  // Enough copies for a measurable interval even at 4 KiB.
  iters = std::max<int>(iters, static_cast<int>((size_t{256} << 20) / bytes));
  std::vector<char> a(bytes, 1), b(bytes, 0);
  std::memcpy(b.data(), a.data(), bytes);
  const double t0 = now_s();
  for (int i = 0; i < iters; ++i) {
    std::memcpy(b.data(), a.data(), bytes);
    a[i % bytes] = b[(i * 7) % bytes];  // keep the copies observable
  }
  return (now_s() - t0) / iters;
}

// One row of the text table (the --json row holds more).
std::string table_line(const bench::Row& row) {
  const auto& r = row;
  if (r.at("backend") == "mpi")
    return fmt::format("{:<15} {:>10} {:>5} {:<8} {:>12.3f} {:>12.3f} {:>12.3f} {:>8.3f}", r.at("collective").get<std::string>(),
                       r.at("bytes").get<size_t>(), r.at("ranks").get<int>(), "mpi",
                       r.at("algbw_gbytes_per_s").get<double>(), r.at("raw_mpi_algbw_gbytes_per_s").get<double>(),
                       r.at("raw_mpi_blocking_algbw_gbytes_per_s").get<double>(), r.at("ratio_vs_raw_mpi").get<double>());
  return fmt::format("{:<15} {:>10} {:>5} {:<8} {:>12.3f} {:>12} {:>12.3f} {:>8.3f} (vs memcpy)",
                     r.at("collective").get<std::string>(), r.at("bytes").get<size_t>(), r.at("ranks").get<int>(),
                     "threads", r.at("algbw_gbytes_per_s").get<double>(), "-", r.at("memcpy_gbytes_per_s").get<double>(),
                     r.at("ratio_vs_memcpy").get<double>());
}

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  CLI::App app{"shardopt communication benchmark"};
  bool json = false;
  size_t min_bytes = 4 << 10, max_bytes = 64 << 20;
  int repeat = 3, thread_ranks = 0;
  std::vector<std::string> collectives = {"all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast"};
  std::string backends = "all";
  bench::add_json_flag(app, json);
  app.add_option("--min-bytes", min_bytes, "smallest per-rank buffer (bytes)");
  app.add_option("--max-bytes", max_bytes, "largest per-rank buffer (bytes); sizes step by 4x");
  bench::add_repeat_option(app, repeat);
  app.add_option("--collectives", collectives, "subset of all_reduce reduce_scatter all_gather all_to_all broadcast");
  app.add_option("--backends", backends, "mpi, threads or all");
  app.add_option("--thread-ranks", thread_ranks, "ranks of the threads backend (default: the MPI world size)");
  CLI11_PARSE(app, argc, argv);

  const int rank = mpi.world_rank(), world = mpi.world_size();
  if (thread_ranks <= 0) thread_ranks = world;
  CommOptions options;  // unchecked: the production setting
  options.checked = false;
  auto comm = mpi.world(options);
  MPI_Comm raw_comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw_comm);

  const bench::Emitter emitter(json, rank == 0);
  auto emit = [&](const bench::Row& row) { emitter(row, table_line(row)); };
  emitter.text(fmt::format("{:<15} {:>10} {:>5} {:<8} {:>12} {:>12} {:>12} {:>8}", "collective", "bytes", "ranks",
                           "backend", "GB/s", "raw_nb GB/s", "raw_blk GB/s", "ratio"));

  if (backends == "all" || backends == "mpi") {
    for (const auto& collective : collectives)
      for (size_t bytes = min_bytes; bytes <= max_bytes; bytes *= 4) {
        Buffers b = make_buffers(bytes, world, rank);
        const int iters = iterations_for(bytes);
        double ours = 1e30, raw = 1e30, raw_blocking = 1e30;
        for (int r = 0; r < repeat; ++r) {  // interleaved so drift hits both alike
          ours = std::min(ours, time_mpi(raw_comm, iters, [&] { shardopt_op(*comm, collective, b); }));
          raw = std::min(raw, time_mpi(raw_comm, iters, [&] { raw_op(raw_comm, collective, b, false); }));
          raw_blocking = std::min(raw_blocking, time_mpi(raw_comm, iters, [&] { raw_op(raw_comm, collective, b, true); }));
        }
        const double bd = static_cast<double>(bytes);
        emit({{"collective", collective}, {"bytes", bytes}, {"ranks", world}, {"backend", "mpi"},
              {"iterations", iters}, {"shardopt_seconds", ours}, {"raw_mpi_seconds", raw},
              {"raw_mpi_blocking_seconds", raw_blocking}, {"ratio_vs_raw_mpi", ours / raw},
              {"algbw_gbytes_per_s", bd / ours / 1e9}, {"raw_mpi_algbw_gbytes_per_s", bd / raw / 1e9},
              {"raw_mpi_blocking_algbw_gbytes_per_s", bd / raw_blocking / 1e9}});
      }
  }

  if (backends == "all" || backends == "threads") {
    if (rank == 0) {
      for (const auto& collective : collectives)
        for (size_t bytes = min_bytes; bytes <= max_bytes; bytes *= 4) {
          const int iters = iterations_for(bytes);
          double ours = 1e30, copy = 1e30;
          for (int r = 0; r < repeat; ++r) {
            ours = std::min(ours, time_threads(thread_ranks, collective, bytes, iters));
            copy = std::min(copy, time_memcpy(bytes, iters));
          }
          const double bd = static_cast<double>(bytes);
          emit({{"collective", collective}, {"bytes", bytes}, {"ranks", thread_ranks}, {"backend", "threads"},
                {"iterations", iters}, {"shardopt_seconds", ours}, {"raw_mpi_seconds", nullptr},
                {"ratio_vs_raw_mpi", nullptr}, {"memcpy_seconds", copy}, {"algbw_gbytes_per_s", bd / ours / 1e9},
                {"memcpy_gbytes_per_s", bd / copy / 1e9}, {"ratio_vs_memcpy", copy / ours}});
        }
    }
    // The other processes sleep (not spin in MPI_Barrier) while rank 0 measures the threads backend.
    MPI_Request req;
    MPI_Ibarrier(raw_comm, &req);
    for (int flag = 0; !flag;) {
      MPI_Test(&req, &flag, MPI_STATUS_IGNORE);
      if (!flag) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  comm.reset();
  MPI_Comm_free(&raw_comm);
  return 0;
}
