// pq_scores kernel: every item's score for every query, written to a [B, N] float32 matrix.
// A CTA holds the S tables of a group of queries in shared memory and strides over item tiles;
// each thread scores one item per tile, so the output writes are coalesced along N.
#pragma once

#include "pq_device.cuh"

namespace recjpq_cuda {

template <typename CodeT, int QB>
__global__ void __launch_bounds__(kThreads)
    pq_scores_kernel(const float* __restrict__ S, const CodeT* __restrict__ codes, int64_t B, int M, int K,
                     int64_t N, int vector_bytes, float* __restrict__ out) {
  float* s_tables = reinterpret_cast<float*>(dynamic_smem());
  const int table = M * K;
  const int64_t b0 = int64_t(blockIdx.y) * QB;
  const int qn = static_cast<int>(min(int64_t(QB), B - b0));
  load_tables(s_tables, S, b0, qn, table);
  __syncthreads();

  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < N; i += int64_t(gridDim.x) * kThreads) {
    float acc[QB];
    score_item<CodeT, QB>(s_tables, table, K, M, qn, codes + i * M, vector_bytes, acc);
#pragma unroll
    for (int q = 0; q < QB; ++q)
      if (q < qn) out[(b0 + q) * N + i] = acc[q];
  }
}

}  // namespace recjpq_cuda
