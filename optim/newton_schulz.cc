#include "optim/newton_schulz.h"

#include <cblas.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "base/env.h"
#include "base/error.h"
#include "optim/simd_util.h"

namespace shardopt::optim {

FloatBuffer::FloatBuffer(size_t count) : size_(count) {
  if (count == 0) return;
  const size_t bytes = (count * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw Error(fmt::format("FloatBuffer: cannot allocate {} bytes", bytes));
  data_.reset(static_cast<float*>(p));
}

void FloatBuffer::Free::operator()(float* p) const { std::free(p); }

// ---- oneDNN products (fp32 or bf16 operands, fp32 accumulation) ----------------------------

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

template <class T>
constexpr dnnl::memory::data_type dnnl_type() {
  if constexpr (std::is_same_v<T, bf16>) return dnnl::memory::data_type::bf16;
  else return dnnl::memory::data_type::f32;
}

// C (M x N, row stride ldc, fp32) = A (M x K, row stride lda) * B, where B (K x N) is either
// row-major with row stride ldb or the transpose of an N x K row-major matrix (ldb); A and B of
// type `operand`.
struct GemmShape {
  int64_t m, n, k, lda, ldb, ldc;
  bool b_transposed;
  dnnl::memory::data_type operand;
  bool operator==(const GemmShape&) const = default;
};

struct DnnlGemm {
  GemmShape shape;
  dnnl::matmul primitive;
  dnnl::memory a, b, c;  // descriptors only; data handles are set per call
};

}  // namespace

struct DnnlNsState {
  dnnl::stream stream{cpu_engine()};
  FloatBuffer y;        // second fp32 iterate, max_elements
  std::vector<bf16> x;  // kBF16, kNative: X rounded to bf16, max_elements
  std::vector<bf16> s;  // kBF16, kNative: A, then a I + B rounded to bf16, max_small_dim^2
  FloatBuffer xr;       // kBF16, kF32Units: X rounded to bf16, in fp32, max_elements
  FloatBuffer sr;       // kBF16, kF32Units: A, then a I + B rounded to bf16, in fp32, max_small_dim^2
  std::vector<DnnlGemm> gemms;

  DnnlGemm& gemm(const GemmShape& sh) {
    for (DnnlGemm& g : gemms)
      if (g.shape == sh) return g;
    using dt = dnnl::memory::data_type;
    const dnnl::memory::desc a({sh.m, sh.k}, sh.operand, {sh.lda, 1});
    const dnnl::memory::desc b({sh.k, sh.n}, sh.operand, sh.b_transposed ? dnnl::memory::dims{1, sh.ldb}
                                                                         : dnnl::memory::dims{sh.ldb, 1});
    const dnnl::memory::desc c({sh.m, sh.n}, dt::f32, {sh.ldc, 1});
    dnnl::matmul primitive(dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), cpu_engine()));
    gemms.push_back({sh, primitive, dnnl::memory(a, cpu_engine(), DNNL_MEMORY_NONE),
                     dnnl::memory(b, cpu_engine(), DNNL_MEMORY_NONE), dnnl::memory(c, cpu_engine(), DNNL_MEMORY_NONE)});
    return gemms.back();
  }

  // Runs a GEMM. fp32 goes through oneDNN's sgemm: no primitive, and no C++ allocation per call
  // (oneDNN 2.6's primitive execute builds an argument map on the heap each time; its sgemm takes
  // one aligned packing buffer from posix_memalign per call instead). bf16 runs the prepared matmul.
  void run(const GemmShape& sh, const void* a, const void* b, float* c) {
    if (sh.operand == dnnl::memory::data_type::f32) {
      if (dnnl_sgemm('N', sh.b_transposed ? 'T' : 'N', sh.m, sh.n, sh.k, 1.0f, static_cast<const float*>(a), sh.lda,
                     static_cast<const float*>(b), sh.ldb, 0.0f, c, sh.ldc) != dnnl_success) {
        throw Error(fmt::format("newton_schulz: oneDNN sgemm {}x{}x{} failed", sh.m, sh.n, sh.k));
      }
      return;
    }
    DnnlGemm& g = gemm(sh);
    g.a.set_data_handle(const_cast<void*>(a));
    g.b.set_data_handle(const_cast<void*>(b));
    g.c.set_data_handle(c);
    const dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, g.a.get()}, {DNNL_ARG_WEIGHTS, g.b.get()}, {DNNL_ARG_DST, g.c.get()}};
    if (dnnl_primitive_execute(g.primitive.get(), stream.get(), 3, args) != dnnl_success) {
      throw Error(fmt::format("newton_schulz: oneDNN matmul {}x{}x{} failed", sh.m, sh.n, sh.k));
    }
  }
};

namespace {

// Rows per block of the symmetric products: the upper-triangle blocks of S S^T are separate GEMMs.
constexpr int64_t kGramBlock = 192;

// Calls fn(row0, rows, col0, cols) for every upper-triangle block of a p x p symmetric product.
template <class Fn>
void for_each_upper_block(int64_t p, Fn&& fn) {
  const int64_t block = p <= 2 * kGramBlock ? p : kGramBlock;
  for (int64_t i = 0; i < p; i += block)
    for (int64_t j = i; j < p; j += block) fn(i, std::min(block, p - i), j, std::min(block, p - j));
}

// Upper triangle (and the diagonal blocks whole) of C = S S^T, S p x k row-major, C p x p fp32.
// With s == nullptr only prepares the primitives.
template <class T>
void gram_upper(DnnlNsState& st, const T* s, int64_t p, int64_t k, float* c) {
  for_each_upper_block(p, [&](int64_t i, int64_t bi, int64_t j, int64_t bj) {
    const GemmShape sh{bi, bj, k, k, k, p, true, dnnl_type<T>()};
    if (s == nullptr) st.gemm(sh);
    else st.run(sh, s + i * k, s + j * k, c + i * p + j);
  });
}

template <class T>
GemmShape update_shape(int64_t p, int64_t q) { return {p, q, p, p, q, q, false, dnnl_type<T>()}; }

template <class T>
void prepare_gemms(DnnlNsState& st, int64_t p, int64_t q) {
  gram_upper<T>(st, nullptr, p, q, nullptr);
  gram_upper<T>(st, nullptr, p, p, nullptr);
  st.gemm(update_shape<T>(p, q));
}

void round_to_bf16(const float* src, bf16* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = to_bf16_rne(src[i]);
}

// src rounded to bf16 (to_bf16_rne) and widened back: bit operations only, so the loop vectorizes.
void round_to_bf16_in_f32(const float* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const uint32_t quiet_nan = (u | 0x400000u) & 0xffff0000u;
    const uint32_t r = (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
    std::memcpy(&dst[i], &r, sizeof r);
  }
}

}  // namespace

Bf16GemmKernel default_bf16_gemm_kernel() {
  const std::string choice = env::get_string("SHARDOPT_NS_BF16_GEMM");
  if (choice == "native") return Bf16GemmKernel::kNative;
  if (choice == "f32") return Bf16GemmKernel::kF32Units;
  if (choice != "auto") {
    throw ConfigError("SHARDOPT_NS_BF16_GEMM='" + choice + "' is not one of auto, native, f32");
  }
  // Measured: Intel AVX512_BF16 without AMX multiplies bf16 at 0.57x its fp32 rate (torch and oneDNN
  // alike); AMD Zen 4 at ~2x; AMX far above fp32.
  static const bool native = [] {
    if (dnnl::get_effective_cpu_isa() == dnnl::cpu_isa::avx512_core_amx) return true;
    return __builtin_cpu_is("amd") && __builtin_cpu_supports("avx512bf16");
  }();
  return native ? Bf16GemmKernel::kNative : Bf16GemmKernel::kF32Units;
}

const char* to_string(Bf16GemmKernel kernel) {
  return kernel == Bf16GemmKernel::kNative ? "native" : "f32";
}

NsWorkspace::NsWorkspace() : bf16_kernel_(default_bf16_gemm_kernel()) {}
NsWorkspace::NsWorkspace(int64_t rows, int64_t cols, NsPrecision precision) : NsWorkspace() {
  reserve(rows, cols, precision);
}
NsWorkspace::~NsWorkspace() = default;
NsWorkspace::NsWorkspace(NsWorkspace&&) noexcept = default;
NsWorkspace& NsWorkspace::operator=(NsWorkspace&&) noexcept = default;

size_t NsWorkspace::bytes() const {
  size_t b = 4 * (x_.size() + a_.size() + b_.size());
  if (dnnl_) {
    b += 4 * (dnnl_->y.size() + dnnl_->xr.size() + dnnl_->sr.size()) + 2 * (dnnl_->x.size() + dnnl_->s.size());
  }
  return b;
}

void NsWorkspace::reserve(int64_t rows, int64_t cols, NsPrecision precision) {
  if (rows < 0 || cols < 0) {
    throw ConfigError(fmt::format("NsWorkspace: matrix shape must be non-negative, found {}x{}", rows, cols));
  }
  const size_t elements = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  const int64_t small_dim = std::min(rows, cols);
  if (elements > max_elements_) {
    x_ = FloatBuffer(elements);
    max_elements_ = elements;
  }
  if (small_dim > max_small_dim_) {
    const size_t square = static_cast<size_t>(small_dim) * static_cast<size_t>(small_dim);
    a_ = FloatBuffer(square);
    b_ = FloatBuffer(square);
    max_small_dim_ = small_dim;
  }
  if (!dnnl_) dnnl_ = std::make_unique<DnnlNsState>();
  if (dnnl_->y.size() < max_elements_) dnnl_->y = FloatBuffer(max_elements_);
  const bool native_bf16 = precision == NsPrecision::kBF16 && bf16_kernel_ == Bf16GemmKernel::kNative;
  const bool bf16_in_f32 = precision == NsPrecision::kBF16 && bf16_kernel_ == Bf16GemmKernel::kF32Units;
  const size_t square = static_cast<size_t>(max_small_dim_ * max_small_dim_);
  if (native_bf16) {
    dnnl_->x.resize(std::max(dnnl_->x.size(), max_elements_));
    dnnl_->s.resize(std::max(dnnl_->s.size(), square));
  }
  if (bf16_in_f32) {
    if (dnnl_->xr.size() < max_elements_) dnnl_->xr = FloatBuffer(max_elements_);
    if (dnnl_->sr.size() < square) dnnl_->sr = FloatBuffer(square);
  }
  if (elements != 0) {
    const int64_t p = small_dim, q = std::max(rows, cols);
    // fp32 products run oneDNN's sgemm: nothing to prepare.
    if (native_bf16) prepare_gemms<bf16>(*dnnl_, p, q);
  }
}

bool NsWorkspace::fits(int64_t rows, int64_t cols, NsPrecision precision) const {
  if (rows < 0 || cols < 0 || static_cast<size_t>(rows) * static_cast<size_t>(cols) > max_elements_ ||
      std::min(rows, cols) > max_small_dim_ || dnnl_ == nullptr || dnnl_->y.size() < max_elements_) {
    return false;
  }
  if (precision == NsPrecision::kF32) return true;
  const size_t square = static_cast<size_t>(max_small_dim_ * max_small_dim_);
  if (bf16_kernel_ == Bf16GemmKernel::kNative) return dnnl_->x.size() >= max_elements_ && dnnl_->s.size() >= square;
  return dnnl_->xr.size() >= max_elements_ && dnnl_->sr.size() >= square;
}

struct NsAccess {
  static float* x(NsWorkspace& w) { return w.x_.data(); }
  static float* a(NsWorkspace& w) { return w.a_.data(); }
  static float* b(NsWorkspace& w) { return w.b_.data(); }
  static DnnlNsState& dnnl(NsWorkspace& w) { return *w.dnnl_; }
};

namespace {

// Copies the upper triangle of the p x p row-major `a` into its lower triangle, in tiles so both
// the reads and the writes stay in cache.
void symmetrize_upper_to_lower(float* a, int64_t p) {
  constexpr int64_t kTile = 64;
  for (int64_t i0 = 0; i0 < p; i0 += kTile) {
    const int64_t i1 = std::min(p, i0 + kTile);
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const int64_t j1 = std::min(p, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t jend = std::min(j1, i);
        for (int64_t j = j0; j < jend; ++j) a[i * p + j] = a[j * p + i];
      }
    }
  }
}

// One iteration src -> dst on the wide orientation. `wide`: src is p x q row-major (X itself);
// otherwise src is q x p row-major (X^T).
void iterate_symmetric(const float* src, float* dst, int64_t p, int64_t q, bool wide, float ca, float cb, float cc,
                       float* a, float* b) {
  const auto pi = static_cast<blasint>(p);
  const auto qi = static_cast<blasint>(q);
  // A = X X^T (upper triangle only).
  if (wide) {
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, pi, qi, 1.0f, src, qi, 0.0f, a, pi);
  } else {
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, pi, qi, 1.0f, src, pi, 0.0f, a, pi);
  }
  // SSYRK reads its input as a general matrix: A must be complete before A A^T.
  symmetrize_upper_to_lower(a, p);
  std::memcpy(b, a, sizeof(float) * static_cast<size_t>(p * p));
  // B = c A A^T + b A (upper triangle), then B += a I so one SSYMM gives a X + B X.
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, pi, pi, cc, a, pi, cb, b, pi);
  for (int64_t i = 0; i < p; ++i) b[i * p + i] += ca;
  if (wide) {
    cblas_ssymm(CblasRowMajor, CblasLeft, CblasUpper, pi, qi, 1.0f, b, pi, src, qi, 0.0f, dst, qi);
  } else {
    // (B X)^T = X^T B for symmetric B.
    cblas_ssymm(CblasRowMajor, CblasRight, CblasUpper, qi, pi, 1.0f, b, pi, src, pi, 0.0f, dst, pi);
  }
}

// The same iteration with plain SGEMMs, as a straightforward implementation would write it.
void iterate_plain(const float* src, float* dst, int64_t p, int64_t q, bool wide, float ca, float cb, float cc,
                   float* a, float* b) {
  const auto pi = static_cast<blasint>(p);
  const auto qi = static_cast<blasint>(q);
  if (wide) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, pi, pi, qi, 1.0f, src, qi, src, qi, 0.0f, a, pi);
  } else {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, pi, pi, qi, 1.0f, src, pi, src, pi, 0.0f, a, pi);
  }
  std::memcpy(b, a, sizeof(float) * static_cast<size_t>(p * p));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, pi, pi, pi, cc, a, pi, a, pi, cb, b, pi);
  std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(p * q));
  if (wide) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, pi, qi, pi, 1.0f, b, pi, src, qi, ca, dst, qi);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qi, pi, pi, 1.0f, src, pi, b, pi, ca, dst, pi);
  }
}

// The oneDNN iteration on the wide orientation (X p x q). X0 (fp32) is in `cur`; the result ends in
// the returned buffer (cur or nxt). T = float: fp32 products, of the matrices themselves or, with
// kRoundInF32, of their bf16 roundings kept in fp32 (Bf16GemmKernel::kF32Units). T = bf16: the
// products take bf16 copies of X, A and a I + B. Sums and iterates stay fp32.
template <class T, bool kRoundInF32 = false>
float* iterate_dnnl(DnnlNsState& st, float* cur, float* nxt, int64_t p, int64_t q, const NsSchedule& schedule,
                    float* a, float* b) {
  const size_t pq = static_cast<size_t>(p * q), pp = static_cast<size_t>(p * p);
  // The GEMM operand of an fp32 matrix: itself, or its bf16 rounding in `copy`.
  auto operand = [&st](const float* m, [[maybe_unused]] bool is_x, [[maybe_unused]] size_t n) -> const T* {
    if constexpr (std::is_same_v<T, bf16>) {
      std::vector<bf16>& copy = is_x ? st.x : st.s;
      round_to_bf16(m, copy.data(), n);
      return copy.data();
    } else if constexpr (kRoundInF32) {
      float* copy = is_x ? st.xr.data() : st.sr.data();
      round_to_bf16_in_f32(m, copy, n);
      return copy;
    } else {
      return m;
    }
  };
  const T* x = operand(cur, true, pq);
  for (const auto& k : schedule.coefficients) {
    gram_upper(st, x, p, q, a);  // A = X X^T
    symmetrize_upper_to_lower(a, p);
    gram_upper(st, operand(a, false, pp), p, p, b);  // A A (= A A^T)
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = i; j < p; ++j) b[i * p + j] = k[1] * a[i * p + j] + k[2] * b[i * p + j];
    // a I is added before rounding: rounding B alone and adding a X after would cost bf16's
    // relative error on |B|, which cancels against a (1x1: a + B = 0.70 from 3.44 - 2.74), i.e.
    // ~4x the error of rounding a I + B. One product then gives a X + B X.
    for (int64_t i = 0; i < p; ++i) b[i * p + i] += k[0];
    symmetrize_upper_to_lower(b, p);
    st.run(update_shape<T>(p, q), operand(b, false, pp), x, nxt);  // (a I + B) X
    x = operand(nxt, true, pq);
    std::swap(cur, nxt);
  }
  st.stream.wait();
  return cur;
}

}  // namespace

double newton_schulz_flops(int64_t rows, int64_t cols, int steps) {
  const double p = static_cast<double>(std::min(rows, cols));
  const double q = static_cast<double>(std::max(rows, cols));
  return static_cast<double>(steps) * (4.0 * p * p * q + 2.0 * p * p * p);
}

void newton_schulz(const float* input, int64_t rows, int64_t cols, float* output, const NsSchedule& schedule,
                   NsWorkspace& workspace, NsAlgorithm algorithm) {
  if (rows < 0 || cols < 0) {
    throw ConfigError(fmt::format("newton_schulz: matrix shape must be non-negative, found {}x{}", rows, cols));
  }
  const int steps = schedule.steps();
  if (steps < 1) throw ConfigError("newton_schulz: the schedule has no iterations (expected >= 1)");
  if (rows == 0 || cols == 0) return;
  if (!workspace.fits(rows, cols, schedule.precision)) {
    throw ConfigError(fmt::format("newton_schulz: workspace too small for a {}x{} matrix{}; reserve() it at setup",
                                  rows, cols,
                                  schedule.precision == NsPrecision::kBF16
                                      ? fmt::format(" in bf16 ({} kernel)", to_string(workspace.bf16_gemm_kernel()))
                                      : ""));
  }
  const int64_t p = std::min(rows, cols);
  const int64_t q = std::max(rows, cols);
  const bool wide = rows <= cols;
  const size_t count = static_cast<size_t>(rows) * static_cast<size_t>(cols);

  const bool in_bf16 = schedule.precision == NsPrecision::kBF16;
  if (in_bf16 || algorithm == NsAlgorithm::kSymmetric) {
    DnnlNsState& st = NsAccess::dnnl(workspace);
    double sum_sq = 0.0;
    for (size_t i = 0; i < count; ++i) sum_sq += static_cast<double>(input[i]) * input[i];
    const double denom = std::max(static_cast<double>(schedule.norm_scale) * std::sqrt(sum_sq) + schedule.norm_add,
                                  static_cast<double>(schedule.norm_floor));
    const float inv = denom > 0.0 ? static_cast<float>(1.0 / denom) : 0.0f;
    // Iterate on the wide orientation in the workspace's two fp32 buffers; a tall input is
    // transposed in and out (O(pq) next to the O(p^2 q) products).
    float* cur = NsAccess::x(workspace);
    float* nxt = st.y.data();
    if (wide) {
      for (size_t i = 0; i < count; ++i) cur[i] = input[i] * inv;
    } else {
      for (int64_t r = 0; r < q; ++r)
        for (int64_t c = 0; c < p; ++c) cur[c * q + r] = input[r * p + c] * inv;
    }
    float* a = NsAccess::a(workspace);
    float* b = NsAccess::b(workspace);
    const float* result =
        !in_bf16 ? iterate_dnnl<float>(st, cur, nxt, p, q, schedule, a, b)
        : workspace.bf16_gemm_kernel() == Bf16GemmKernel::kNative
            ? iterate_dnnl<bf16>(st, cur, nxt, p, q, schedule, a, b)
            : iterate_dnnl<float, true>(st, cur, nxt, p, q, schedule, a, b);
    if (wide) {
      std::memcpy(output, result, sizeof(float) * count);
    } else {
      for (int64_t r = 0; r < q; ++r)
        for (int64_t c = 0; c < p; ++c) output[r * p + c] = result[c * q + r];
    }
    return;
  }

  // OpenBLAS: ping-pong between `output` and the workspace so that the last iteration lands in `output`.
  float* other = NsAccess::x(workspace);
  float* src = (steps % 2 == 1) ? other : output;
  float* dst = (steps % 2 == 1) ? output : other;

  double sum_sq = 0.0;
  for (size_t i = 0; i < count; ++i) sum_sq += static_cast<double>(input[i]) * input[i];
  const double norm = std::sqrt(sum_sq);
  const double denom = std::max(static_cast<double>(schedule.norm_scale) * norm + schedule.norm_add,
                                static_cast<double>(schedule.norm_floor));
  const float inv = denom > 0.0 ? static_cast<float>(1.0 / denom) : 0.0f;
  for (size_t i = 0; i < count; ++i) src[i] = input[i] * inv;

  float* a = NsAccess::a(workspace);
  float* b = NsAccess::b(workspace);
  for (int s = 0; s < steps; ++s) {
    const auto& k = schedule.coefficients[static_cast<size_t>(s)];
    if (algorithm == NsAlgorithm::kPlainGemm) {
      iterate_plain(src, dst, p, q, wide, k[0], k[1], k[2], a, b);
    } else {
      iterate_symmetric(src, dst, p, q, wide, k[0], k[1], k[2], a, b);
    }
    std::swap(src, dst);
  }
}

}  // namespace shardopt::optim
