// C-style launchers of recjpq's CUDA kernels: raw pointers, sizes and a stream, no PyTorch types,
// so the kernels build with nvcc alone and any host code can call them.
//
// Layouts (all row-major, contiguous):
//   S          float32 [B, M, K]          sub-item score tables
//   codes      [N, M] of code_bytes each  (1 = uint8, 2 = int16, 4 = int32), values in [0, K)
//   out        float32 [B, N]             pq_scores output
//   exclude    int64 [B, E], each row sorted ascending, -1 = no item (may be null when E == 0)
//   thresholds int64 [B]                  per-query k-th key, set to INT64_MIN before the launch
//   candidates int64 [B, grid_x, k]       each CTA's top-k packed keys (see recjpq/topk_keys.py)
//
// A packed key is (order-preserving int32 of the score) << 32 | (2^32 - 1 - item), so one int64
// comparison orders by score, then by lower item index; INT64_MIN marks "no item".
//
// Every launcher checks its arguments (including the dynamic shared memory against the current
// device's opt-in limit) and returns cudaErrorInvalidValue on a bad one, else the launch status.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Threads per CTA; each scores one item per tile, so a tile holds this many items.
#define RECJPQ_CUDA_THREADS 256
// Largest k the fused top-k supports (candidate buffers live in shared memory).
#define RECJPQ_CUDA_MAX_K 1024

// Dynamic shared memory of one pq_topk CTA: `query_group` S tables plus `buffer_len` keys per query.
size_t recjpq_pq_topk_smem_bytes(int M, int K, int query_group, int buffer_len);

// Dynamic shared memory of one pq_scores CTA: `query_group` S tables.
size_t recjpq_pq_scores_smem_bytes(int M, int K, int query_group);

// out[b, i] = sum_m S[b, m, codes[i, m]], added in order m = 0..M-1 in float32.
// Grid: grid_x CTAs per group of `query_group` (1, 2 or 4) queries, striding over item tiles.
cudaError_t recjpq_pq_scores(const float* S, const void* codes, int code_bytes, int64_t B, int M, int K,
                             int64_t N, float* out, int query_group, int grid_x, cudaStream_t stream);

// Per-CTA exact top-k candidates: every item of the global top-k of query b (excluded items
// skipped) is among candidates[b, :, :]; merging them with one top-k gives the answer.
// buffer_len: a power of two >= k + RECJPQ_CUDA_THREADS, the per-query candidate buffer.
cudaError_t recjpq_pq_topk_candidates(const float* S, const void* codes, int code_bytes, const int64_t* exclude,
                                      int64_t E, int64_t B, int M, int K, int64_t N, int k, int buffer_len,
                                      int query_group, int grid_x, int64_t* thresholds, int64_t* candidates,
                                      cudaStream_t stream);

#ifdef __cplusplus
}
#endif
