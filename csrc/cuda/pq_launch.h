// Host-side checks shared by the launchers: arguments, shared memory against the device's limit.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "pq_device.cuh"

namespace recjpq_cuda {

// The widest code load (16 or 8 bytes, else 0 for one code at a time) that every item's row of
// M codes splits into with aligned loads.
template <typename CodeT>
inline int codes_vector_bytes(const void* codes, int M) {
  const size_t row = M * sizeof(CodeT);
  const uintptr_t address = reinterpret_cast<uintptr_t>(codes);
  for (int bytes : {16, 8})
    if (row % bytes == 0 && address % bytes == 0) return bytes;
  return 0;
}

// Checks shared by both launchers; the dynamic shared memory is checked against the device's
// opt-in limit (minus this kernel's static shared memory) and granted to `kernel`.
template <typename Kernel>
inline cudaError_t check_and_grant_smem(Kernel kernel, size_t smem) {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attrs;
  err = cudaFuncGetAttributes(&attrs, kernel);
  if (err != cudaSuccess) return err;
  if (smem + attrs.sharedSizeBytes > size_t(optin)) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

inline bool valid_problem(const float* S, const void* codes, int code_bytes, int64_t B, int M, int K, int64_t N,
                          int query_group, int grid_x) {
  if (S == nullptr || codes == nullptr) return false;
  if (code_bytes != 1 && code_bytes != 2 && code_bytes != 4) return false;
  if (B < 1 || M < 1 || K < 1 || N < 1 || N > int64_t(UINT32_MAX)) return false;
  if (int64_t(M) * K * 4 > int64_t(INT32_MAX)) return false;  // table offsets are int
  if (query_group != 1 && query_group != 2 && query_group != 4) return false;
  if (grid_x < 1 || (B + query_group - 1) / query_group > kMaxGridY) return false;
  return true;
}

inline bool valid_topk(int64_t N, int k, int buffer_len, int64_t E, const int64_t* exclude, const int64_t* thresholds,
                       const int64_t* candidates) {
  if (thresholds == nullptr || candidates == nullptr || E < 0 || (E > 0 && exclude == nullptr)) return false;
  if (k < 1 || k > RECJPQ_CUDA_MAX_K || int64_t(k) > N) return false;
  return (buffer_len & (buffer_len - 1)) == 0 && buffer_len >= k + kThreads;
}

}  // namespace recjpq_cuda
