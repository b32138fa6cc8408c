// Launcher of the pq_scores kernel (pq_scores_kernel.cuh): C entry points of pq_kernels.h.
#include "pq_launch.h"
#include "pq_scores_kernel.cuh"

namespace recjpq_cuda {
namespace {

template <typename CodeT, int QB>
cudaError_t launch(const float* S, const void* codes, int64_t B, int M, int K, int64_t N, float* out, int grid_x,
                   cudaStream_t stream) {
  auto kernel = pq_scores_kernel<CodeT, QB>;
  const size_t smem = tables_bytes(M, K, QB);
  cudaError_t err = check_and_grant_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(grid_x, static_cast<unsigned>((B + QB - 1) / QB));
  kernel<<<grid, kThreads, smem, stream>>>(S, static_cast<const CodeT*>(codes), B, M, K, N,
                                           codes_vector_bytes<CodeT>(codes, M), out);
  return cudaGetLastError();
}

template <typename CodeT>
cudaError_t launch_group(int query_group, const float* S, const void* codes, int64_t B, int M, int K, int64_t N,
                         float* out, int grid_x, cudaStream_t stream) {
  switch (query_group) {
    case 1: return launch<CodeT, 1>(S, codes, B, M, K, N, out, grid_x, stream);
    case 2: return launch<CodeT, 2>(S, codes, B, M, K, N, out, grid_x, stream);
    default: return launch<CodeT, 4>(S, codes, B, M, K, N, out, grid_x, stream);
  }
}

}  // namespace
}  // namespace recjpq_cuda

extern "C" size_t recjpq_pq_scores_smem_bytes(int M, int K, int query_group) {
  return recjpq_cuda::tables_bytes(M, K, query_group);
}

extern "C" cudaError_t recjpq_pq_scores(const float* S, const void* codes, int code_bytes, int64_t B, int M, int K,
                                        int64_t N, float* out, int query_group, int grid_x, cudaStream_t stream) {
  using namespace recjpq_cuda;
  if (!valid_problem(S, codes, code_bytes, B, M, K, N, query_group, grid_x) || out == nullptr)
    return cudaErrorInvalidValue;
  switch (code_bytes) {
    case 1: return launch_group<uint8_t>(query_group, S, codes, B, M, K, N, out, grid_x, stream);
    case 2: return launch_group<int16_t>(query_group, S, codes, B, M, K, N, out, grid_x, stream);
    default: return launch_group<int32_t>(query_group, S, codes, B, M, K, N, out, grid_x, stream);
  }
}
