// GPU figures: Newton–Schulz (NS5) on cuBLAS bf16 for single and batched matrices, the device's
// own bf16 GEMM rate, copy bandwidth and AdamW-shaped in-place RMW bandwidth measured in the same
// run, the fused AdamW step's bandwidth against both, the AdamW step with q8 state under each compact
// kernel (warp, vector: against the fp32 step and the RMW ceiling), Muon's q8 momentum codec under
// each kernel (against the copy bandwidth), and one full Muon step. Prints figures, never
// passes or fails on time.
// Usage: gpu_bench [--json] [--quick] [--elementwise-only]
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench/common/bench_util.h"
#include "bench/gpu/device_ceilings.h"
#include "optim/config.h"
#include "optim/cuda/compact_elementwise.h"
#include "optim/cuda/cuda_check.h"
#include "optim/cuda/elementwise.h"
#include "optim/cuda/muon.h"
#include "optim/cuda/newton_schulz.h"

namespace {

using namespace shardopt;
using namespace shardopt::cuda;

bench::Emitter emit(false);  // set from --json in main

// Random device data (never zeros: they can run faster than real data).
template <typename T>
T* random_device(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<T> host(n);
  for (auto& x : host) {
    const float f = dist(gen);
    if constexpr (sizeof(T) == 2) {
      x = T{float_to_bf16(f).bits};
    } else {
      x = f;
    }
  }
  T* dev = nullptr;
  SHARDOPT_CUDA_CHECK(cudaMalloc(&dev, n * sizeof(T)));
  SHARDOPT_CUDA_CHECK(cudaMemcpy(dev, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shardopt GPU kernels: NS5 on cuBLAS, fused AdamW, Muon step"};
  bool json = false, quick = false, elementwise_only = false;
  bench::add_json_flag(app, json);
  app.add_flag("--quick", quick, "small shapes only (smoke run)");
  app.add_flag("--elementwise-only", elementwise_only,
               "the ceilings and the element-wise rows only (fp32 and q8 AdamW, q8 momentum codec): no GEMM, NS, Muon");
  CLI11_PARSE(app, argc, argv);
  emit = bench::Emitter(json);
  if (device_count() == 0) {
    std::fprintf(stderr, "gpu_bench: no CUDA device; nothing to measure\n");
    return 0;
  }
  cudaDeviceProp prop{};
  SHARDOPT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  emit({{"bench", "device"}, {"name", prop.name}, {"sm_count", prop.multiProcessorCount},
        {"memory_gib", double(prop.totalGlobalMem) / (1 << 30)}});
  const int reps = quick ? 5 : 20;

  // Device copy bandwidth and the AdamW-shaped in-place stream, counting bytes read + written.
  const double copy_gbps = bench::device_copy_bandwidth(size_t(1) << 31, reps).gbytes_per_s;
  emit({{"bench", "memcpy_d2d"}, {"bytes", size_t(1) << 31}, {"gbytes_per_s_read_plus_write", copy_gbps}});
  const auto rmw = bench::device_rmw_bandwidth(size_t(64) << 20, reps);
  emit({{"bench", "rmw_stream"}, {"elements", size_t(64) << 20}, {"seconds", rmw.seconds},
        {"gbytes_per_s_read_plus_write", rmw.gbytes_per_s}, {"ratio_vs_memcpy", rmw.gbytes_per_s / copy_gbps}});

  // The device's bf16 GEMM rate through cuBLAS (fp32 accumulation), 8192³.
  double gemm_tflops = 0;
  if (!elementwise_only) {
    const int n = 8192;
    auto* a = random_device<uint16_t>(size_t(n) * n, 1);
    auto* b = random_device<uint16_t>(size_t(n) * n, 2);
    uint16_t* c = nullptr;
    SHARDOPT_CUDA_CHECK(cudaMalloc(&c, size_t(n) * n * 2));
    cublasHandle_t h;
    SHARDOPT_CUBLAS_CHECK(cublasCreate(&h));
    const float one = 1, zero = 0;
    const double s = bench::median_event_seconds(
        [&] {
          SHARDOPT_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b,
                                             CUDA_R_16BF, n, &zero, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT));
        },
        3, reps);
    gemm_tflops = 2.0 * n * double(n) * n / s / 1e12;
    emit({{"bench", "gemm_bf16"}, {"m", n}, {"n", n}, {"k", n}, {"seconds", s}, {"tflops", gemm_tflops}});
    cublasDestroy(h);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
  }

  // NS5 (default coefficients, 5 steps) on bf16 input.
  struct Shape {
    int64_t rows, cols, batch;
  };
  std::vector<Shape> shapes = {{1024, 1024, 1}, {2048, 2048, 1}, {4096, 4096, 1}, {4096, 11008, 1},
                               {11008, 4096, 1}, {1024, 1024, 16}, {2048, 2048, 8}};
  if (elementwise_only) shapes.clear();
  for (const Shape& sh : shapes) {
    const size_t n = size_t(sh.rows * sh.cols * sh.batch);
    auto* in = random_device<uint16_t>(n, 3);
    uint16_t* out = nullptr;
    SHARDOPT_CUDA_CHECK(cudaMalloc(&out, n * 2));
    // Full GEMMs (the default), the GEMM-epilogue combine against them (same run), then the blocked
    // symmetric products with 2 and 4 blocks.
    double full_gemm_seconds = 0;
    for (int variant : {1, 0, 2, 4}) {  // symmetric blocks; 0 = full GEMMs with the epilogue combine
      const int blocks = std::max(variant, 1);
      if (blocks > 1 && (quick || std::min(sh.rows, sh.cols) % blocks != 0)) continue;
      NsOptions options;
      options.symmetric_blocks = blocks;
      if (variant == 0) options.combine = NsCombine::kGemmEpilogue;
      NewtonSchulzCuda ns(sh.rows, sh.cols, sh.batch, options);
      const double s = bench::median_event_seconds(
          [&] { ns.orthogonalize(in, DType::kBF16, reinterpret_cast<bf16*>(out), sh.batch, nullptr); }, 2, reps);
      if (variant == 1) full_gemm_seconds = s;
      const double flops = ns.plain_gemm_flops() * double(sh.batch);
      const char* impl = variant == 1   ? "shardopt_cublas"
                         : variant == 0 ? "shardopt_cublaslt_epilogue_combine"
                                        : "shardopt_cublas_symmetric_blocks";
      emit({{"bench", "ns5"}, {"impl", impl}, {"rows", sh.rows}, {"cols", sh.cols}, {"batch", sh.batch},
            {"symmetric_blocks", blocks}, {"combine", variant == 0 ? "epilogue" : "kernel"}, {"seconds", s},
            {"tflops_plain_gemm_count", flops / s / 1e12}, {"ratio_vs_gemm_bf16", flops / s / 1e12 / gemm_tflops},
            {"time_ratio_vs_full_gemms", s / full_gemm_seconds}});
    }
    cudaFree(in);
    cudaFree(out);
  }

  // The GEMM shapes of NS on llama-1b's matrices, in every operand layout cuBLAS offers: which layout
  // runs fastest for X·Xᵀ (p×p×q) and B·X (p×q×p), the two products that dominate the Muon phase.
  if (!quick && !elementwise_only) {
    cublasHandle_t h;
    SHARDOPT_CUBLAS_CHECK(cublasCreate(&h));
    struct Gemm {
      const char* product;
      int m, n, k;
    };
    const Gemm gemms[] = {{"x_xt", 2048, 2048, 5632}, {"b_x", 5632, 2048, 2048}, {"x_xt", 2048, 2048, 2048},
                          {"b_x", 2048, 2048, 2048}, {"x_xt", 256, 256, 2048}, {"b_x", 2048, 256, 256}};
    for (const Gemm& g : gemms) {
      const size_t biggest = size_t(std::max({g.m, g.n, g.k})) * size_t(std::max({g.m, g.n, g.k}));
      auto* a = random_device<uint16_t>(biggest, 11);
      auto* b = random_device<uint16_t>(biggest, 12);
      uint16_t* c = nullptr;
      SHARDOPT_CUDA_CHECK(cudaMalloc(&c, size_t(g.m) * g.n * 2));
      const float one = 1, zero = 0;
      for (int ta : {0, 1})
        for (int tb : {0, 1}) {
          const cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
          const int lda = ta ? g.k : g.m, ldb = tb ? g.n : g.k;
          const double s = bench::median_event_seconds(
              [&] {
                SHARDOPT_CUBLAS_CHECK(cublasGemmEx(h, oa, ob, g.m, g.n, g.k, &one, a, CUDA_R_16BF, lda, b, CUDA_R_16BF,
                                                   ldb, &zero, c, CUDA_R_16BF, g.m, CUBLAS_COMPUTE_32F,
                                                   CUBLAS_GEMM_DEFAULT));
              },
              3, reps);
          const double tflops = 2.0 * g.m * double(g.n) * g.k / s / 1e12;
          emit({{"bench", "gemm_layout"}, {"product", g.product}, {"m", g.m}, {"n", g.n}, {"k", g.k},
                {"layout", std::string(ta ? "T" : "N") + (tb ? "T" : "N")}, {"seconds", s}, {"tflops", tflops},
                {"ratio_vs_gemm_bf16", tflops / gemm_tflops}});
        }
      cudaFree(a);
      cudaFree(b);
      cudaFree(c);
    }
    cublasDestroy(h);
  }

  // Fused AdamW over 64 Mi elements in 16 slices: fp32 grads, with and without the bf16 mirror.
  double adamw_f32_seconds = 0;  // without the mirror, for the q8 row
  for (bool mirror : {false, true}) {
    const size_t total = size_t(64) << 20, slices = 16, per = total / slices;
    float* p = random_device<float>(total, 4);
    float* g = random_device<float>(total, 5);
    float* m = random_device<float>(total, 6);
    float* v = nullptr;
    SHARDOPT_CUDA_CHECK(cudaMalloc(&v, total * 4));
    SHARDOPT_CUDA_CHECK(cudaMemset(v, 0, total * 4));
    bf16* mir = nullptr;
    if (mirror) SHARDOPT_CUDA_CHECK(cudaMalloc(&mir, total * 2));
    std::vector<DeviceSlice> sl;
    for (size_t i = 0; i < slices; ++i)
      sl.push_back(DeviceSlice{p + i * per, g + i * per, m + i * per, v + i * per, mir ? mir + i * per : nullptr, per});
    ElementwiseOptimizerCuda opt(ElementwiseAlgorithm::kAdamW, DType::kF32);
    opt.set_slices(sl);
    int64_t t = 1;
    const double s = bench::median_event_seconds([&] { opt.step(AdamWHyper{}, t++, nullptr); }, 3, reps);
    const double bytes = double(total) * (16 + 12 + (mirror ? 2 : 0));  // read p,g,m,v; write p,m,v(,bf16)
    if (!mirror) adamw_f32_seconds = s;
    emit({{"bench", "adamw_fused"}, {"elements", total}, {"slices", slices}, {"bf16_mirror", mirror},
          {"seconds", s}, {"gbytes_per_s", bytes / s / 1e9}, {"ratio_vs_memcpy", bytes / s / 1e9 / copy_gbps},
          {"ratio_vs_rmw_ceiling", bytes / s / 1e9 / rmw.gbytes_per_s}});
    cudaFree(p);
    cudaFree(g);
    cudaFree(m);
    cudaFree(v);
    if (mir) cudaFree(mir);
  }

  // AdamW with q8 state (optim/cuda/compact_elementwise.h) over the same 64 Mi elements in 16 slices,
  // fp32 grads, no mirror, under each kernel (CompactKernel: warp, vector; same results): bytes are
  // p, g read, p written (12 B), m and v codes read and written (4 B), and each 256-element block's
  // two absmax read and written (16 B per block). The slices are aligned (cudaMalloc'd buffers,
  // 4 Mi-element slices): the vector kernel's wide accesses throughout (aligned_chunks).
  {
    const size_t total = size_t(64) << 20, slices = 16, per = total / slices, blocks = total / 256;
    float* p = random_device<float>(total, 4);
    float* g = random_device<float>(total, 5);
    uint8_t* codes = nullptr;
    float* absmax = random_device<float>(2 * blocks, 6);
    float* absmax_start = random_device<float>(2 * blocks, 6);
    SHARDOPT_CUDA_CHECK(cudaMalloc(&codes, 2 * total));
    std::vector<DeviceCompactSlice> sl;
    for (size_t i = 0; i < slices; ++i) {
      DeviceCompactSlice d;
      d.param = p + i * per;
      d.grad = g + i * per;
      d.count = per;
      for (int k = 0; k < 2; ++k) {
        d.state[k].dtype = proto::STATE_Q8;
        d.state[k].nonnegative = k == 1;
        d.state[k].values = codes + k * total + i * per;
        d.state[k].absmax = absmax + k * blocks + i * per / 256;
      }
      sl.push_back(d);
    }
    const optim::OptimizerParams params =
        optim::resolve_optimizer_config(optim::default_optimizer_config(proto::OPTIMIZER_ADAMW));
    const double bytes = double(total) * (12 + 4) + double(blocks) * 16;
    double warp_seconds = 0;
    for (CompactKernel kernel : {CompactKernel::kWarp, CompactKernel::kVector}) {
      // The same starting state for each kernel: mid-range codes, decoded against |absmax|.
      SHARDOPT_CUDA_CHECK(cudaMemset(codes, 0x55, 2 * total));
      SHARDOPT_CUDA_CHECK(cudaMemcpy(absmax, absmax_start, 2 * blocks * sizeof(float), cudaMemcpyDeviceToDevice));
      CompactElementwiseOptimizerCuda opt(params, proto::STATE_Q8, DType::kF32, kernel);
      opt.set_slices(sl);
      int64_t t = 1;
      const double s = bench::median_event_seconds([&] { opt.step(params, float(params.lr), t++, nullptr); }, 3, reps);
      if (kernel == CompactKernel::kWarp) warp_seconds = s;
      emit({{"bench", "adamw_q8_state"}, {"kernel", std::string(compact_kernel_name(kernel))},
            {"elements", total}, {"slices", slices}, {"chunks", opt.chunk_count()},
            {"aligned_chunks", opt.aligned_chunk_count()}, {"seconds", s}, {"bytes_moved", bytes},
            {"gbytes_per_s", bytes / s / 1e9}, {"time_ratio_vs_f32_adamw", s / adamw_f32_seconds},
            {"time_ratio_vs_warp_kernel", s / warp_seconds},
            {"ratio_vs_rmw_ceiling", bytes / s / 1e9 / rmw.gbytes_per_s}});
    }
    cudaFree(p);
    cudaFree(g);
    cudaFree(codes);
    cudaFree(absmax);
    cudaFree(absmax_start);
  }

  // Muon's compact momentum codec (CompactCodecCuda, signed q8) over 64 Mi elements in 16 arrays,
  // under each kernel: decode reads the codes and absmax and writes fp32 (5 B per element + 4 B per
  // block), encode the reverse; against the device copy bandwidth (read + write).
  {
    const size_t total = size_t(64) << 20, arrays = 16, per = total / arrays, blocks = total / 256;
    float* f32 = random_device<float>(total, 10);
    uint8_t* codes = nullptr;
    float* absmax = nullptr;
    SHARDOPT_CUDA_CHECK(cudaMalloc(&codes, total));
    SHARDOPT_CUDA_CHECK(cudaMalloc(&absmax, blocks * sizeof(float)));
    std::vector<DeviceCompactArray> ar;
    for (size_t i = 0; i < arrays; ++i) {
      DeviceCompactArray a;
      a.state.dtype = proto::STATE_Q8;
      a.state.values = codes + i * per;
      a.state.absmax = absmax + i * per / 256;
      a.f32 = f32 + i * per;
      a.count = per;
      ar.push_back(a);
    }
    const double bytes = double(total) * 5 + double(blocks) * 4;
    double warp_seconds[2] = {0, 0};
    for (CompactKernel kernel : {CompactKernel::kWarp, CompactKernel::kVector}) {
      CompactCodecCuda codec(kernel);
      codec.set_arrays(ar);
      for (bool encode : {true, false}) {
        const double s = bench::median_event_seconds(
            [&] {
              if (encode) codec.encode(nullptr);
              else codec.decode(nullptr);
            },
            3, reps);
        if (kernel == CompactKernel::kWarp) warp_seconds[encode] = s;
        emit({{"bench", "q8_momentum_codec"}, {"kernel", std::string(compact_kernel_name(kernel))},
              {"direction", encode ? "encode" : "decode"}, {"elements", total}, {"arrays", arrays},
              {"aligned_chunks", codec.aligned_chunk_count()}, {"seconds", s}, {"bytes_moved", bytes},
              {"gbytes_per_s", bytes / s / 1e9}, {"time_ratio_vs_warp_kernel", s / warp_seconds[encode]},
              {"ratio_vs_memcpy", bytes / s / 1e9 / copy_gbps}});
      }
    }
    cudaFree(f32);
    cudaFree(codes);
    cudaFree(absmax);
  }

  // One full Muon step (momentum + NS5 + apply) on 4096×4096 fp32 params and grads.
  if (!elementwise_only) {
    const int64_t rows = 4096, cols = 4096;
    const size_t n = size_t(rows * cols);
    float* p = random_device<float>(n, 7);
    float* g = random_device<float>(n, 8);
    float* m = random_device<float>(n, 9);
    MuonCuda muon(rows, cols, 1);
    const double s =
        bench::median_event_seconds([&] { muon.step(p, g, DType::kF32, m, nullptr, 1, MuonHyper{}, nullptr); }, 2, reps);
    emit({{"bench", "muon_step"}, {"rows", rows}, {"cols", cols}, {"seconds", s},
          {"tflops_plain_gemm_count", muon.newton_schulz().plain_gemm_flops() / s / 1e12}});
    cudaFree(p);
    cudaFree(g);
    cudaFree(m);
  }
  return 0;
}
