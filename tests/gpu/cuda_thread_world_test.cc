// The threads backend on device buffers (comm/cuda_buffer_mover.h), against the host threads
// backend: the reduction kernel equals the host reduction bit for bit for every dtype and reduce op
// (infinities and aliased outputs included; NaN in the same places), and a sequence of every collective on device
// buffers gives every rank the bytes the host world gives. The Engine on it runs in
// engine_cuda_test.cc (its device suites use this world).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <vector>

#include "base/error.h"
#include "comm/cuda_buffer_mover.h"
#include "comm/reduce_kernel.h"
#include "tests/gpu/gpu_test_util.h"

namespace shardopt::comm {
namespace {

using Bytes = std::vector<unsigned char>;

// Random elements of `dtype` as bytes; with `specials`, floating types include NaN and infinities.
Bytes random_elements(DType dtype, size_t n, uint32_t seed, bool specials) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> real(-100.0f, 100.0f);
  std::uniform_int_distribution<int> pick(0, 99);
  Bytes out(n * dtype_size(dtype));
  for (size_t i = 0; i < n; ++i) {
    float f = real(rng);
    const int k = specials ? pick(rng) : 99;
    if (k == 0) f = std::numeric_limits<float>::infinity();
    if (k == 1) f = -std::numeric_limits<float>::infinity();
    if (k == 2) f = std::nanf("");
    unsigned char* at = out.data() + i * dtype_size(dtype);
    switch (dtype) {
      case DType::kF32: std::memcpy(at, &f, 4); break;
      case DType::kBF16: { const bf16 b = float_to_bf16(f); std::memcpy(at, &b, 2); break; }
      case DType::kF16: { const _Float16 h = static_cast<_Float16>(f); std::memcpy(at, &h, 2); break; }
      case DType::kI32: { const int32_t v = static_cast<int32_t>(rng()); std::memcpy(at, &v, 4); break; }
      case DType::kI64: { const int64_t v = static_cast<int64_t>(uint64_t{rng()} << 32 | rng()); std::memcpy(at, &v, 8); break; }
      case DType::kU8: at[0] = static_cast<unsigned char>(rng()); break;
      default: break;
    }
  }
  return out;
}

bool is_nan(DType dtype, const unsigned char* p) {
  switch (dtype) {
    case DType::kF32: { float f; std::memcpy(&f, p, 4); return std::isnan(f); }
    case DType::kBF16: { bf16 b; std::memcpy(&b, p, 2); return std::isnan(bf16_to_float(b)); }
    case DType::kF16: { _Float16 h; std::memcpy(&h, p, 2); return std::isnan(static_cast<float>(h)); }
    default: return false;
  }
}

// Index of the first element where a and b differ, NaN equal to any NaN (the two processors make
// different NaN bit patterns: x86 propagates an operand's, CUDA returns its canonical one); -1 if none.
int64_t first_difference(DType dtype, const Bytes& a, const Bytes& b) {
  const size_t e = dtype_size(dtype);
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i * e < a.size(); ++i) {
    const unsigned char *x = a.data() + i * e, *y = b.data() + i * e;
    if (std::memcmp(x, y, e) != 0 && !(is_nan(dtype, x) && is_nan(dtype, y))) return static_cast<int64_t>(i);
  }
  return -1;
}

void* to_device(const Bytes& b) {
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(b.size(), 1)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, b.data(), b.size(), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}
Bytes from_device(const void* p, size_t bytes) {
  Bytes b(bytes);
  EXPECT_EQ(cudaMemcpy(b.data(), p, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  return b;
}

TEST(CudaThreadWorld, ReductionEqualsTheHostReductionBitForBit) {
  SHARDOPT_REQUIRE_GPU();
  auto mover = cuda_buffer_mover(0);
  const size_t len = 4099;
  uint32_t seed = 1;
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64, DType::kU8})
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin})
      for (int n : {1, 2, 3, 5})
        for (bool aliased : {false, true}) {  // aliased: output 0 is input 0, as in an in-place all-reduce
          std::vector<Bytes> in(static_cast<size_t>(n));
          for (auto& b : in) b = random_elements(dtype, len, seed++, true);
          const size_t bytes = len * dtype_size(dtype);
          // Host reference.
          std::vector<Bytes> host_in = in;
          Bytes host_out2(bytes);
          std::vector<const void*> hin;
          for (auto& b : host_in) hin.push_back(b.data());
          std::vector<void*> hout = {aliased ? host_in[0].data() : nullptr, host_out2.data()};
          Bytes host_out1(bytes);
          if (!aliased) hout[0] = host_out1.data();
          detail::reduce_elements(dtype, op, hin, hout, len);
          // Device.
          std::vector<void*> dev_in;
          for (auto& b : in) dev_in.push_back(to_device(b));
          void* dev_out1 = aliased ? dev_in[0] : to_device(Bytes(bytes));
          void* dev_out2 = to_device(Bytes(bytes));
          std::vector<const void*> din(dev_in.begin(), dev_in.end());
          std::vector<void*> dout = {dev_out1, dev_out2};
          mover->reduce(dtype, op, din, dout, len);
          mover->finish();
          const std::string what = std::string(dtype_name(dtype)) + " " + std::string(reduce_op_name(op)) + " n=" +
                                   std::to_string(n) + (aliased ? " aliased" : "");
          EXPECT_EQ(first_difference(dtype, from_device(dev_out1, bytes), aliased ? host_in[0] : host_out1), -1)
              << what;
          EXPECT_EQ(first_difference(dtype, from_device(dev_out2, bytes), host_out2), -1) << what;
          for (void* p : dev_in) cudaFree(p);
          if (!aliased) cudaFree(dev_out1);
          cudaFree(dev_out2);
        }
}

// Inputs of the collective sequence: a function of (rank, operation, index).
Bytes input(int rank, int op, DType dtype, size_t n) {
  return random_elements(dtype, n, static_cast<uint32_t>(1000 * rank + op), false);
}

// Every rank's received bytes, operation after operation, on the host world or the device world.
std::vector<std::vector<Bytes>> run_sequence(int world, bool device) {
  std::vector<std::vector<Bytes>> out(static_cast<size_t>(world));
  std::mutex mu;
  CommOptions options;
  options.checked = true;
  options.timeout = std::chrono::milliseconds(120000);
  run_ranks(
      world,
      [&](Communicator& comm) {
        const int r = comm.rank(), n = comm.size();
        std::vector<Bytes> mine;
        std::vector<void*> owned;
        auto buffer = [&](const Bytes& b) -> void* {
          if (!device) {
            auto* p = new unsigned char[std::max<size_t>(b.size(), 1)];
            std::memcpy(p, b.data(), b.size());
            owned.push_back(p);
            return p;
          }
          void* p = to_device(b);
          owned.push_back(p);
          return p;
        };
        auto read = [&](const void* p, size_t bytes) {
          if (device) return from_device(p, bytes);
          const auto* c = static_cast<const unsigned char*>(p);
          return Bytes(c, c + bytes);
        };
        auto run = [&](const WorkPtr& w, const void* result, size_t bytes) {
          w->wait();
          mine.push_back(read(result, bytes));
        };
        // 1. All-reduce sum of 20 M floats: more than one 64 MiB chunk.
        {
          const size_t c = 20'000'003;
          void* s = buffer(input(r, 1, DType::kF32, c));
          void* d = buffer(Bytes(c * 4));
          run(comm.all_reduce(s, d, c, DType::kF32, ReduceOp::kSum), d, c * 4);
        }
        // 2. In-place bf16 average; 3. i64 max.
        {
          void* b = buffer(input(r, 2, DType::kBF16, 5003));
          run(comm.all_reduce(b, b, 5003, DType::kBF16, ReduceOp::kAvg), b, 5003 * 2);
          void* s = buffer(input(r, 3, DType::kI64, 777));
          void* d = buffer(Bytes(777 * 8));
          run(comm.all_reduce(s, d, 777, DType::kI64, ReduceOp::kMax), d, 777 * 8);
        }
        // 4. Reduce-scatter and 5. all-gather over uneven counts (rank 0's empty).
        std::vector<size_t> counts(static_cast<size_t>(n));
        size_t total = 0;
        for (int q = 0; q < n; ++q) total += counts[q] = q == 0 ? 0 : 1000 * q + 3;
        {
          void* s = buffer(input(r, 4, DType::kF32, total));
          void* d = buffer(Bytes(counts[r] * 4));
          run(comm.reduce_scatter(s, d, counts, DType::kF32, ReduceOp::kSum), d, counts[r] * 4);
          void* g = buffer(input(r, 5, DType::kBF16, counts[r]));
          void* all = buffer(Bytes(total * 2));
          run(comm.all_gather(g, all, counts, DType::kBF16), all, total * 2);
        }
        // 6. All-to-all with pair-dependent counts.
        {
          std::vector<size_t> send(static_cast<size_t>(n)), recv(static_cast<size_t>(n));
          size_t ns = 0, nr = 0;
          for (int q = 0; q < n; ++q) {
            ns += send[q] = static_cast<size_t>((r + 2 * q) % 3) * 100 + 1;
            nr += recv[q] = static_cast<size_t>((q + 2 * r) % 3) * 100 + 1;
          }
          void* s = buffer(input(r, 6, DType::kF32, ns));
          void* d = buffer(Bytes(nr * 4));
          run(comm.all_to_all(s, send, d, recv, DType::kF32), d, nr * 4);
        }
        // 7. Broadcast from the last rank; 8. a ring of send/recv; 9. reduce to rank 0.
        {
          void* b = buffer(input(r, 7, DType::kU8, 300));
          run(comm.broadcast(b, 300, DType::kU8, n - 1), b, 300);
          void* s = buffer(input(r, 8, DType::kF32, 2048));
          void* d = buffer(Bytes(2048 * 4));
          run(comm.sendrecv(s, 2048, (r + 1) % n, d, 2048, (r + n - 1) % n, DType::kF32, 0), d, 2048 * 4);
          void* x = buffer(input(r, 9, DType::kI32, 999));
          void* y = buffer(Bytes(999 * 4));
          run(comm.reduce(x, y, 999, DType::kI32, ReduceOp::kSum, 0), y, r == 0 ? 999 * 4 : 0);
        }
        for (void* p : owned) {
          if (device) cudaFree(p);
          else delete[] static_cast<unsigned char*>(p);
        }
        std::lock_guard lk(mu);
        out[static_cast<size_t>(r)] = std::move(mine);
      },
      options, device ? cuda_buffer_mover(0) : nullptr);
  return out;
}

TEST(CudaThreadWorld, EveryCollectiveEqualsTheHostWorld) {
  SHARDOPT_REQUIRE_GPU();
  for (int world : {1, 2, 3, 4}) {
    const auto host = run_sequence(world, false);
    const auto dev = run_sequence(world, true);
    for (int r = 0; r < world; ++r) {
      ASSERT_EQ(dev[r].size(), host[r].size());
      for (size_t k = 0; k < host[r].size(); ++k)
        EXPECT_TRUE(dev[r][k] == host[r][k]) << "world " << world << " rank " << r << " operation " << k + 1;
    }
  }
}

TEST(CudaThreadWorld, RanksReportDeviceBuffersAndLimitsAreErrors) {
  SHARDOPT_REQUIRE_GPU();
  auto comms = make_cuda_thread_world(2, 0);
  EXPECT_TRUE(comms[0]->device_buffers());
  EXPECT_THROW(make_cuda_thread_world(kMaxCudaThreadWorld + 1, 0), ConfigError);
  EXPECT_THROW(cuda_buffer_mover(testing::cuda_devices()), DeviceError);
}

TEST(CudaThreadWorldWithoutGpu, NoDeviceIsADeviceError) {
  if (testing::cuda_devices() > 0) GTEST_SKIP() << "a CUDA device is present: the no-device error is not reachable";
  EXPECT_THROW(cuda_buffer_mover(0), DeviceError);
}

}  // namespace
}  // namespace shardopt::comm
