#include "optim/cuda/muon.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "base/error.h"
#include "optim/cuda/cuda_check.h"
#include "optim/cuda/kernels.h"

namespace shardopt::cuda {

double muon_shape_scale(ShapeScale scale, int64_t rows, int64_t cols) {
  const double m = double(rows), n = double(cols);
  switch (scale) {
    case ShapeScale::kOriginal: return std::sqrt(std::max(1.0, m / n));
    case ShapeScale::kMatchRmsAdamW: return 0.2 * std::sqrt(std::max(m, n));
    case ShapeScale::kSpectral: return std::sqrt(m / n);
  }
  return 1.0;
}

MuonCuda::MuonCuda(int64_t rows, int64_t cols, int64_t max_batch, NsOptions ns_options)
    : ns_(rows, cols, max_batch, std::move(ns_options)), rows_(rows), max_batch_(max_batch) {
  try {
    SHARDOPT_CUDA_CHECK(cudaMalloc(&row_scale_, size_t(max_batch) * size_t(rows) * sizeof(float)));
    SHARDOPT_CUDA_CHECK(cudaMalloc(&norm_sums_, size_t(max_batch) * 2 * sizeof(double)));
  } catch (...) {
    if (row_scale_ != nullptr) cudaFree(row_scale_);
    throw;
  }
}

size_t MuonCuda::device_bytes() const {
  return ns_.device_bytes() + size_t(max_batch_) * size_t(rows_) * sizeof(float) + size_t(max_batch_) * 2 * sizeof(double);
}

MuonCuda::~MuonCuda() {
  cudaFree(row_scale_);
  cudaFree(norm_sums_);
}

namespace {
void check_grad_dtype(DType grad_dtype) {
  if (grad_dtype != DType::kF32 && grad_dtype != DType::kBF16)
    throw ConfigError("MuonCuda::step: gradient dtype must be f32 or bf16, got " +
                      std::string(dtype_name(grad_dtype)));
}
void check_hyper(const MuonHyper& h) {
  if (h.nesterov && h.momentum <= 0.0f)
    throw ConfigError("MuonHyper: Nesterov needs momentum > 0, got " + std::to_string(h.momentum));
}
detail::MuonScalars scalars(const MuonHyper& h) {
  detail::MuonScalars s{};
  s.momentum = h.momentum;
  s.averaged = h.convention == MomentumConvention::kAveraged;
  s.nesterov = h.nesterov;
  return s;
}
}  // namespace

void MuonCuda::step(float* param, const void* grad, DType grad_dtype, float* momentum, bf16* param_bf16,
                    int64_t batch, const MuonHyper& h, cudaStream_t stream) {
  check_grad_dtype(grad_dtype);
  if (param == nullptr || grad == nullptr || momentum == nullptr)
    throw ConfigError("MuonCuda::step: param, grad and momentum pointers are required, found null");
  check_hyper(h);
  if (h.normuon) throw ConfigError("MuonCuda::step: NorMuon needs the row moments of the table step");
  const size_t per_matrix = size_t(ns_.rows()) * size_t(ns_.cols());
  ns_.begin_prepared(batch, stream);
  detail::launch_muon_momentum(grad, grad_dtype == DType::kBF16, momentum, ns_.prepared_input(), ns_.prepared_sumsq(),
                               scalars(h), per_matrix, int(batch), stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
  const uint16_t* ortho = ns_.run_prepared(batch, stream);
  const double scale = muon_shape_scale(h.shape_scale, ns_.rows(), ns_.cols());
  const float decay = static_cast<float>(1.0 - double(h.lr) * h.weight_decay);
  const float step = static_cast<float>(double(h.lr) * scale);
  detail::launch_muon_apply(param, reinterpret_cast<uint16_t*>(param_bf16), ortho, decay, step, per_matrix,
                            int(batch), stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

void MuonCuda::step(const MatrixRefs* device_refs, DType grad_dtype, int64_t batch, const MuonHyper& h,
                    cudaStream_t stream) {
  check_grad_dtype(grad_dtype);
  if (device_refs == nullptr) throw ConfigError("MuonCuda::step: no matrix table");
  check_hyper(h);
  const size_t per_matrix = size_t(ns_.rows()) * size_t(ns_.cols());
  ns_.begin_prepared(batch, stream);
  detail::launch_muon_momentum(device_refs, grad_dtype == DType::kBF16, ns_.prepared_input(), ns_.prepared_sumsq(),
                               scalars(h), per_matrix, int(batch), stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
  const uint16_t* ortho = ns_.run_prepared(batch, stream);
  const double scale = muon_shape_scale(h.shape_scale, ns_.rows(), ns_.cols());
  const float decay = static_cast<float>(1.0 - double(h.lr) * h.weight_decay);
  const float step = static_cast<float>(double(h.lr) * scale);
  if (!h.normuon) {
    detail::launch_muon_apply(device_refs, ortho, decay, step, per_matrix, int(batch), stream);
    SHARDOPT_CUDA_CHECK_LAUNCH();
    return;
  }
  SHARDOPT_CUDA_CHECK(cudaMemsetAsync(norm_sums_, 0, size_t(batch) * 2 * sizeof(double), stream));
  detail::launch_normuon_rows(device_refs, ortho, ns_.rows(), ns_.cols(), h.normuon_beta2, h.normuon_eps, row_scale_,
                              norm_sums_, int(batch), stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
  detail::launch_normuon_apply(device_refs, ortho, ns_.rows(), ns_.cols(), decay, step, row_scale_, norm_sums_,
                               int(batch), stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

}  // namespace shardopt::cuda
