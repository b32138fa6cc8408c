// pq_topk kernel: fused scoring and exact top-k selection, without a [B, N] score matrix.
//
// A persistent grid: gridDim.y covers groups of QB queries, and the grid_x CTAs of a group stride
// over tiles of kThreads items. A CTA keeps the group's S tables in shared memory and, per query,
// a candidate buffer of `buffer_len` packed keys (score high, reversed item index low).
//
// Selection is a threshold filter: an item enters a query's buffer only if its key beats the
// query's threshold, a key known to be no better than the k-th best of the query; only items that
// pass it are looked up in the exclusions. Each warp filters its 32 items and appends the passing
// keys with one shared-memory atomicAdd (warp_append). When a buffer could overflow on the next tile, the CTA sorts it, keeps its best
// k, and raises the threshold to its k-th key; it also publishes that key to `thresholds[b]` with
// atomicMax, and every CTA of the group reads it back before each tile (a relaxed device-scope
// load: any value it returns is some CTA's k-th key, so a stale one only filters less). Any CTA's k-th key is a
// valid bound: k of its own items score at least that much, so no item below it can be in the
// query's top k.
//
// At the end each CTA writes its best k keys per query; one top-k over the grid_x * k candidates
// of a query (done by the caller) gives the exact answer, ties broken towards the lower index.
#pragma once

#include <climits>

#include "pq_device.cuh"

namespace recjpq_cuda {

constexpr long long kEmptyKey = LLONG_MIN;  // "no item": below every real key

// The recjpq/topk_keys.py packing: order-preserving int32 of the score (with -0.0 folded into
// +0.0) in the high half, 2^32 - 1 - item in the low half.
__device__ __forceinline__ long long pack_key(float score, int64_t item) {
  int bits = __float_as_int(score);
  if (bits == INT_MIN) bits = 0;
  const unsigned ordered = static_cast<unsigned>(bits >= 0 ? bits : bits ^ 0x7FFFFFFF);
  const unsigned long long low = 0xFFFFFFFFull - static_cast<unsigned long long>(item);
  return static_cast<long long>((static_cast<unsigned long long>(ordered) << 32) | low);
}

// The published threshold of a query: a relaxed load at device scope (no ordering is needed, see
// above), which, unlike a volatile load, is neither system-scope nor strong.
__device__ __forceinline__ long long load_threshold(const int64_t* threshold) {
#ifdef RECJPQ_HOST_EMULATION
  return std::atomic_ref<long long>(*reinterpret_cast<long long*>(const_cast<int64_t*>(threshold)))
      .load(std::memory_order_relaxed);
#else
  long long value;
  asm volatile("ld.relaxed.gpu.global.s64 %0, [%1];" : "=l"(value) : "l"(threshold));
  return value;
#endif
}

// Binary search of a sorted exclusion row (-1 entries sort first and match no item).
__device__ __forceinline__ bool is_excluded(const int64_t* row, int64_t E, int64_t item) {
  int64_t lo = 0, hi = E;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(row + mid) < item) lo = mid + 1;
    else hi = mid;
  }
  return lo < E && __ldg(row + lo) == item;
}

// Appends the keys of the lanes with `pass` to a shared buffer: the lanes vote, lane 0 reserves
// the warp's slots with one atomicAdd, and each passing lane writes at base + its rank among them.
// At most kWarpSize keys per call and warp. Every lane of the warp must call it (full-mask votes).
__device__ __forceinline__ void warp_append(long long* keys, int* count, long long key, bool pass) {
  const unsigned passing = __ballot_sync(kFullWarp, pass);
  if (passing == 0) return;  // the common case once the threshold has settled
  const unsigned lane = threadIdx.x % kWarpSize;
  int base = 0;
  if (lane == 0) base = atomicAdd(count, __popc(passing));
  base = __shfl_sync(kFullWarp, base, 0);
  if (pass) keys[base + __popc(passing & ((1u << lane) - 1u))] = key;
}

// Block-wide bitonic sort, descending, of len (a power of two) keys in shared memory. Every thread
// of the CTA must call it; it ends with a barrier.
__device__ inline void sort_descending(long long* keys, int len) {
  for (int size = 2; size <= len; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < len / 2; t += kThreads) {
        const int i = 2 * t - (t & (stride - 1));  // i has bit `stride` clear; its partner is i + stride
        const long long a = keys[i], b = keys[i + stride];
        const bool descending = (i & size) == 0;
        if (descending ? a < b : a > b) {
          keys[i] = b;
          keys[i + stride] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Sorts one query's buffer (the first `count` slots hold keys, the rest become empty) and keeps
// its best k: count drops to at most k and, once k keys exist, the thresholds rise to the k-th.
// Called by every thread with the same `count`.
__device__ inline void shrink_to_k(long long* keys, int count, int len, int k, int* s_count, long long* s_threshold,
                            int64_t* threshold) {
  for (int j = count + threadIdx.x; j < len; j += kThreads) keys[j] = kEmptyKey;
  __syncthreads();
  sort_descending(keys, len);
  if (threadIdx.x == 0) {
    if (count >= k) {
      const long long kth = keys[k - 1];
      if (kth > *s_threshold) *s_threshold = kth;
      atomicMax(reinterpret_cast<long long*>(threshold), kth);
    }
    *s_count = min(count, k);
  }
  __syncthreads();
}

template <typename CodeT, int QB>
__global__ void __launch_bounds__(kThreads)
    pq_topk_kernel(const float* __restrict__ S, const CodeT* __restrict__ codes, const int64_t* __restrict__ exclude,
                   int64_t E, int64_t B, int M, int K, int64_t N, int k, int len, int vector_bytes,
                   int64_t* thresholds, int64_t* __restrict__ candidates) {
  float* s_tables = reinterpret_cast<float*>(dynamic_smem());
  long long* s_keys = reinterpret_cast<long long*>(dynamic_smem() + tables_bytes(M, K, QB));
  __shared__ int s_count[QB];
  __shared__ long long s_threshold[QB];

  const int table = M * K;
  const int64_t b0 = int64_t(blockIdx.y) * QB;
  const int qn = static_cast<int>(min(int64_t(QB), B - b0));
  load_tables(s_tables, S, b0, qn, table);
  if (threadIdx.x < QB) {
    s_count[threadIdx.x] = 0;
    s_threshold[threadIdx.x] = kEmptyKey;
  }

  const int64_t tiles = (N + kThreads - 1) / kThreads;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    if (static_cast<int>(threadIdx.x) < qn) {
      const long long global = load_threshold(thresholds + b0 + threadIdx.x);
      if (global > s_threshold[threadIdx.x]) s_threshold[threadIdx.x] = global;
    }
    __syncthreads();

    // Lanes past N score nothing but still vote, so every warp reaches warp_append whole.
    const int64_t item = tile * kThreads + threadIdx.x;
    const bool in_range = item < N;
    float acc[QB] = {};
    if (in_range) score_item<CodeT, QB>(s_tables, table, K, M, qn, codes + item * M, vector_bytes, acc);
#pragma unroll
    for (int q = 0; q < QB; ++q) {
      if (q >= qn) continue;  // the same for the whole CTA
      const long long key = pack_key(acc[q], item);
      const bool pass = in_range && key > s_threshold[q] &&
                        (E == 0 || !is_excluded(exclude + (b0 + q) * E, E, item));
      // One reservation of <= 32 slots per warp: at most kThreads keys per tile, and
      // count <= len - kThreads before it, so no overflow (docs/cuda-kernels.md).
      warp_append(s_keys + q * len, &s_count[q], key, pass);
    }
    __syncthreads();

    for (int q = 0; q < qn; ++q) {
      const int count = s_count[q];
      if (count > len - kThreads)
        shrink_to_k(s_keys + q * len, count, len, k, &s_count[q], &s_threshold[q], thresholds + b0 + q);
    }
  }

  __syncthreads();  // the last tile may have skipped every shrink
  for (int q = 0; q < qn; ++q) {
    long long* keys = s_keys + q * len;
    shrink_to_k(keys, s_count[q], len, k, &s_count[q], &s_threshold[q], thresholds + b0 + q);
    int64_t* out = candidates + ((b0 + q) * gridDim.x + blockIdx.x) * k;
    for (int j = threadIdx.x; j < k; j += kThreads) out[j] = keys[j];
  }
}

}  // namespace recjpq_cuda
