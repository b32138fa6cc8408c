// Device helpers shared by the pq_scores and pq_topk kernels: S tables in shared memory and one
// item's score from its codes. Kernels live in *_kernel.cuh, launchers in *.cu; the split lets
// csrc/cuda/host_emulation run the kernel code on CPU threads in tests.
#pragma once

#include <stdint.h>
#include <vector_types.h>

#include "pq_kernels.h"

namespace recjpq_cuda {

constexpr int kThreads = RECJPQ_CUDA_THREADS;
constexpr int kMaxGridY = 65535;  // query groups ride on gridDim.y
constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;  // every warp-level intrinsic here runs on all 32 lanes
static_assert(kThreads % kWarpSize == 0, "a CTA is whole warps, so every lane reaches the warp intrinsics");

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) & ~size_t(15); }

__host__ __device__ inline size_t tables_bytes(int M, int K, int query_group) {
  return align16(size_t(query_group) * M * K * sizeof(float));
}

// Dynamic shared memory of a pq_topk CTA: the tables, then buffer_len int64 keys per query.
inline size_t topk_smem_bytes(int M, int K, int query_group, int buffer_len) {
  return tables_bytes(M, K, query_group) + size_t(query_group) * buffer_len * sizeof(long long);
}

// The CTA's dynamic shared memory, 16-byte aligned.
#ifdef RECJPQ_HOST_EMULATION
char* dynamic_smem();  // csrc/cuda/host_emulation provides a per-CTA buffer
#else
__device__ __forceinline__ char* dynamic_smem() {
  extern __shared__ float4 smem[];
  return reinterpret_cast<char*>(smem);
}
#endif

// Copies the S tables of queries [b0, b0 + qn) (contiguous in S) to shared memory, 16 bytes at a
// time when the source allows it.
__device__ inline void load_tables(float* s_tables, const float* S, int64_t b0, int qn, int table) {
  const float* src = S + b0 * table;
  const int total = qn * table;
  if ((reinterpret_cast<uintptr_t>(src) & 15) == 0 && (total & 3) == 0) {
    const float4* src4 = reinterpret_cast<const float4*>(src);
    float4* dst4 = reinterpret_cast<float4*>(s_tables);
    for (int j = threadIdx.x; j < total / 4; j += blockDim.x) dst4[j] = __ldg(src4 + j);
  } else {
    for (int j = threadIdx.x; j < total; j += blockDim.x) s_tables[j] = __ldg(src + j);
  }
}

// Adds the S rows of an item's codes, loaded LoadT (8 or 16 bytes) at a time: `row` is aligned
// to sizeof(LoadT) and M codes fill whole loads.
template <typename LoadT, typename CodeT, int QB>
__device__ __forceinline__ void add_vector_rows(const float* s_tables, int table, int K, int M, int qn,
                                                const CodeT* row, float (&acc)[QB]) {
  constexpr int kPerLoad = sizeof(LoadT) / sizeof(CodeT);
  union Chunk {
    LoadT raw;
    CodeT code[kPerLoad];
  };
  const LoadT* rows = reinterpret_cast<const LoadT*>(row);
  const int loads = M / kPerLoad;
  for (int c = 0; c < loads; ++c) {
    Chunk chunk;
    chunk.raw = __ldg(rows + c);
#pragma unroll
    for (int j = 0; j < kPerLoad; ++j) {
      const int offset = (c * kPerLoad + j) * K + static_cast<int>(chunk.code[j]);
#pragma unroll
      for (int q = 0; q < QB; ++q)
        if (q < qn) acc[q] += s_tables[q * table + offset];
    }
  }
}

// Adds S[q, m, row[m]] for m = 0..M-1, in that order, into acc[q] for the first qn queries: the
// reference's float32 summation order, so scores match it bit for bit. vector_bytes (16, 8 or 0,
// from codes_vector_bytes) picks 16- or 8-byte code loads (M = 8 uint8 codes: one 8-byte load),
// else one load per code.
template <typename CodeT, int QB>
__device__ __forceinline__ void score_item(const float* s_tables, int table, int K, int M, int qn,
                                           const CodeT* row, int vector_bytes, float (&acc)[QB]) {
#pragma unroll
  for (int q = 0; q < QB; ++q) acc[q] = 0.0f;
  if (vector_bytes == 16) {
    add_vector_rows<uint4, CodeT, QB>(s_tables, table, K, M, qn, row, acc);
  } else if (vector_bytes == 8) {
    add_vector_rows<uint2, CodeT, QB>(s_tables, table, K, M, qn, row, acc);
  } else {
    for (int m = 0; m < M; ++m) {
      const int offset = m * K + static_cast<int>(__ldg(row + m));
#pragma unroll
      for (int q = 0; q < QB; ++q)
        if (q < qn) acc[q] += s_tables[q * table + offset];
    }
  }
}

}  // namespace recjpq_cuda
