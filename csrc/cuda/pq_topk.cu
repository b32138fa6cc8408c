// Launcher of the pq_topk kernel (pq_topk_kernel.cuh): C entry points of pq_kernels.h.
#include "pq_launch.h"
#include "pq_topk_kernel.cuh"

namespace recjpq_cuda {
namespace {

template <typename CodeT, int QB>
cudaError_t launch(const float* S, const void* codes, const int64_t* exclude, int64_t E, int64_t B, int M, int K,
                   int64_t N, int k, int len, int grid_x, int64_t* thresholds, int64_t* candidates,
                   cudaStream_t stream) {
  auto kernel = pq_topk_kernel<CodeT, QB>;
  const size_t smem = topk_smem_bytes(M, K, QB, len);
  cudaError_t err = check_and_grant_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(grid_x, static_cast<unsigned>((B + QB - 1) / QB));
  kernel<<<grid, kThreads, smem, stream>>>(S, static_cast<const CodeT*>(codes), exclude, E, B, M, K, N, k, len,
                                           codes_vector_bytes<CodeT>(codes, M), thresholds, candidates);
  return cudaGetLastError();
}

template <typename CodeT>
cudaError_t launch_group(int query_group, const float* S, const void* codes, const int64_t* exclude, int64_t E,
                         int64_t B, int M, int K, int64_t N, int k, int len, int grid_x, int64_t* thresholds,
                         int64_t* candidates, cudaStream_t stream) {
  switch (query_group) {
    case 1: return launch<CodeT, 1>(S, codes, exclude, E, B, M, K, N, k, len, grid_x, thresholds, candidates, stream);
    case 2: return launch<CodeT, 2>(S, codes, exclude, E, B, M, K, N, k, len, grid_x, thresholds, candidates, stream);
    default: return launch<CodeT, 4>(S, codes, exclude, E, B, M, K, N, k, len, grid_x, thresholds, candidates, stream);
  }
}

}  // namespace
}  // namespace recjpq_cuda

extern "C" size_t recjpq_pq_topk_smem_bytes(int M, int K, int query_group, int buffer_len) {
  return recjpq_cuda::topk_smem_bytes(M, K, query_group, buffer_len);
}

extern "C" cudaError_t recjpq_pq_topk_candidates(const float* S, const void* codes, int code_bytes,
                                                 const int64_t* exclude, int64_t E, int64_t B, int M, int K,
                                                 int64_t N, int k, int buffer_len, int query_group, int grid_x,
                                                 int64_t* thresholds, int64_t* candidates, cudaStream_t stream) {
  using namespace recjpq_cuda;
  if (!valid_problem(S, codes, code_bytes, B, M, K, N, query_group, grid_x) ||
      !valid_topk(N, k, buffer_len, E, exclude, thresholds, candidates))
    return cudaErrorInvalidValue;
  switch (code_bytes) {
    case 1: return launch_group<uint8_t>(query_group, S, codes, exclude, E, B, M, K, N, k, buffer_len, grid_x,
                                         thresholds, candidates, stream);
    case 2: return launch_group<int16_t>(query_group, S, codes, exclude, E, B, M, K, N, k, buffer_len, grid_x,
                                         thresholds, candidates, stream);
    default: return launch_group<int32_t>(query_group, S, codes, exclude, E, B, M, K, N, k, buffer_len, grid_x,
                                          thresholds, candidates, stream);
  }
}
