// The CUDA runtime and cuBLAS calls of the emulated GPU suites on host memory (device pointers are
// host pointers: the emulated kernels run on the CPU, synchronously, so a stream or an event is only a
// handle and every operation is done when it returns). One device, number 0; cudaMemGetInfo reports
// what cudaMalloc handed out. cublasGemmStridedBatchedEx and cublasLtMatmul (strided batches, the
// layouts and operations the Newton-Schulz code sets) are one plain loop: fp32 (or bf16) operands,
// fp32 accumulation, the output rounded to its type once (cuBLAS's order of the sums differs).
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <map>
#include <vector>
#include <mutex>

namespace {

constexpr size_t kEmulatedDeviceBytes = size_t{80} << 30;

std::mutex& allocations_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<void*, size_t>& allocations() {
  static std::map<void*, size_t> sizes;
  return sizes;
}
size_t& allocated_bytes() {
  static size_t bytes = 0;
  return bytes;
}

float load(const void* base, cudaDataType type, size_t i) {
  if (type == CUDA_R_32F) return static_cast<const float*>(base)[i];
  uint16_t bits = static_cast<const uint16_t*>(base)[i];
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
void store(void* base, cudaDataType type, size_t i, float v) {
  if (type == CUDA_R_32F) {
    static_cast<float*>(base)[i] = v;
    return;
  }
  static_cast<uint16_t*>(base)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// D = alpha op(A) op(B) + beta C per batch member, column-major as cuBLAS (C may be D; ldc is C's and
// D's leading dimension, strideC their batch stride).
cublasStatus_t host_gemm(bool ta, bool tb, int m, int n, int k, float a, const void* A, cudaDataType Atype,
                         int64_t lda, int64_t strideA, const void* B, cudaDataType Btype, int64_t ldb, int64_t strideB,
                         float b, const void* C, void* D, cudaDataType Ctype, int64_t ldc, int64_t strideC, int batch) {
  for (auto type : {Atype, Btype, Ctype})
    if (type != CUDA_R_32F && type != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
  const size_t ea = Atype == CUDA_R_32F ? 4 : 2, eb = Btype == CUDA_R_32F ? 4 : 2, ec = Ctype == CUDA_R_32F ? 4 : 2;
  // op(A) as m x k and op(B) as k x n, row-major fp32; sum over l in ascending order for each (i, j),
  // with j innermost so the loop vectorizes.
  std::vector<float> opa(static_cast<size_t>(m) * k), opb(static_cast<size_t>(k) * n), row(static_cast<size_t>(n));
  for (int q = 0; q < batch; ++q) {
    const auto* pa = static_cast<const char*>(A) + static_cast<size_t>(q) * strideA * ea;
    const auto* pb = static_cast<const char*>(B) + static_cast<size_t>(q) * strideB * eb;
    const auto* pc = static_cast<const char*>(C) + static_cast<size_t>(q) * strideC * ec;
    auto* pd = static_cast<char*>(D) + static_cast<size_t>(q) * strideC * ec;
    for (int i = 0; i < m; ++i)
      for (int l = 0; l < k; ++l)
        opa[static_cast<size_t>(i) * k + l] =
            load(pa, Atype, ta ? static_cast<size_t>(i) * lda + l : static_cast<size_t>(l) * lda + i);
    for (int l = 0; l < k; ++l)
      for (int j = 0; j < n; ++j)
        opb[static_cast<size_t>(l) * n + j] =
            load(pb, Btype, tb ? static_cast<size_t>(l) * ldb + j : static_cast<size_t>(j) * ldb + l);
    for (int i = 0; i < m; ++i) {
      std::fill(row.begin(), row.end(), 0.0f);
      for (int l = 0; l < k; ++l) {
        const float x = opa[static_cast<size_t>(i) * k + l];
        const float* y = opb.data() + static_cast<size_t>(l) * n;
        for (int j = 0; j < n; ++j) row[static_cast<size_t>(j)] += x * y[j];
      }
      for (int j = 0; j < n; ++j) {
        const size_t ic = static_cast<size_t>(j) * ldc + i;
        const float sum = row[static_cast<size_t>(j)];
        store(pd, Ctype, ic, b == 0.0f ? a * sum : a * sum + b * load(pc, Ctype, ic));
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

// cuBLASLt's descriptors: plain structs behind its opaque handles.
struct LtLayout {
  cudaDataType type;
  uint64_t rows, cols;
  int64_t ld, stride = 0;
  int32_t batch = 1;
};
struct LtOp {
  cublasOperation_t a = CUBLAS_OP_N, b = CUBLAS_OP_N;
};
LtLayout& layout_of(cublasLtMatrixLayout_t l) { return *reinterpret_cast<LtLayout*>(l); }
LtOp& op_of(cublasLtMatmulDesc_t d) { return *reinterpret_cast<LtOp*>(d); }

}  // namespace

extern "C" {
cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::aligned_alloc(256, (n + 255) / 256 * 256);  // cudaMalloc's alignment at least
  if (*p == nullptr && n != 0) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lock(allocations_mutex());
  allocations()[*p] = n;
  allocated_bytes() += n;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(allocations_mutex());
    const auto it = allocations().find(p);
    if (it != allocations().end()) {
      allocated_bytes() -= it->second;
      allocations().erase(it);
    }
  }
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> lock(allocations_mutex());
  *total_bytes = kEmulatedDeviceBytes;
  *free_bytes = kEmulatedDeviceBytes - allocated_bytes();
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (n > 0) std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  if (n > 0) std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* dst, int value, size_t n) {
  std::memset(dst, value, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t) {
  std::memset(dst, value, n);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  *stream = reinterpret_cast<cudaStream_t>(new char);  // a distinct handle
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete reinterpret_cast<char*>(stream);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamQuery(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = reinterpret_cast<cudaEvent_t>(new char);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete reinterpret_cast<char*>(event);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "host emulation"; }
const char* cudaGetErrorName(cudaError_t) { return "host emulation"; }

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = reinterpret_cast<cublasHandle_t>(new char);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  delete reinterpret_cast<char*>(handle);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
const char* cublasGetStatusName(cublasStatus_t) { return "host emulation"; }
const char* cublasGetStatusString(cublasStatus_t) { return "host emulation"; }

// C = alpha op(A) op(B) + beta C per batch member, column-major as cuBLAS.
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t transa, cublasOperation_t transb, int m,
                                          int n, int k, const void* alpha, const void* A, cudaDataType Atype, int lda,
                                          long long strideA, const void* B, cudaDataType Btype, int ldb,
                                          long long strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long strideC, int batch, cublasComputeType_t, cublasGemmAlgo_t) {
  return host_gemm(transa != CUBLAS_OP_N, transb != CUBLAS_OP_N, m, n, k, *static_cast<const float*>(alpha), A, Atype,
                   lda, strideA, B, Btype, ldb, strideB, *static_cast<const float*>(beta), C, C, Ctype, ldc, strideC,
                   batch);
}

// cuBLASLt: the matmul of strided batches with column-major layouts and fp32 scales.
cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  *handle = reinterpret_cast<cublasLtHandle_t>(new char);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
  delete reinterpret_cast<char*>(handle);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  *layout = reinterpret_cast<cublasLtMatrixLayout_t>(new LtLayout{type, rows, cols, ld});
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete &layout_of(layout);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attr,
                                                const void* buf, size_t size) {
  if (attr == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT && size == sizeof(int32_t))
    std::memcpy(&layout_of(layout).batch, buf, size);
  else if (attr == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET && size == sizeof(int64_t))
    std::memcpy(&layout_of(layout).stride, buf, size);
  else
    return CUBLAS_STATUS_NOT_SUPPORTED;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute, cudaDataType_t scale) {
  if (compute != CUBLAS_COMPUTE_32F || scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  *desc = reinterpret_cast<cublasLtMatmulDesc_t>(new LtOp{});
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete &op_of(desc);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void* buf, size_t size) {
  if (size != sizeof(cublasOperation_t)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (attr == CUBLASLT_MATMUL_DESC_TRANSA)
    std::memcpy(&op_of(desc).a, buf, size);
  else if (attr == CUBLASLT_MATMUL_DESC_TRANSB)
    std::memcpy(&op_of(desc).b, buf, size);
  else
    return CUBLAS_STATUS_NOT_SUPPORTED;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  *pref = reinterpret_cast<cublasLtMatmulPreference_t>(new char);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete reinterpret_cast<char*>(pref);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t, cublasLtMatmulPreferenceAttributes_t,
                                                    const void*, size_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                              cublasLtMatmulPreference_t, int requested,
                                              cublasLtMatmulHeuristicResult_t results[], int* count) {
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  results[0] = cublasLtMatmulHeuristicResult_t{};
  *count = 1;
  return CUBLAS_STATUS_SUCCESS;
}
// Checks what the real library requires of an out-of-place product: C and D of one layout; the
// operands' stored shapes consistent with op(A) m x k, op(B) k x n and D m x n; one batch count.
cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t Adesc, const void* B, cublasLtMatrixLayout_t Bdesc,
                              const void* beta, const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t*, void*, size_t, cudaStream_t) {
  const LtOp& op = op_of(desc);
  const LtLayout &la = layout_of(Adesc), &lb = layout_of(Bdesc), &lc = layout_of(Cdesc), &ld = layout_of(Ddesc);
  const bool ta = op.a != CUBLAS_OP_N, tb = op.b != CUBLAS_OP_N;
  const uint64_t m = ld.rows, n = ld.cols, k = ta ? la.rows : la.cols;
  if (lc.type != ld.type || lc.rows != ld.rows || lc.cols != ld.cols || lc.ld != ld.ld || lc.stride != ld.stride ||
      lc.batch != ld.batch || la.batch != ld.batch || lb.batch != ld.batch || (ta ? la.cols : la.rows) != m ||
      (tb ? lb.rows : lb.cols) != n || (tb ? lb.cols : lb.rows) != k)
    return CUBLAS_STATUS_INVALID_VALUE;
  return host_gemm(ta, tb, int(m), int(n), int(k), *static_cast<const float*>(alpha), A, la.type, la.ld, la.stride, B,
                   lb.type, lb.ld, lb.stride, *static_cast<const float*>(beta), C, D, ld.type, ld.ld, ld.stride, ld.batch);
}
}
