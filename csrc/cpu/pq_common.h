// Shared pieces of the CPU PQ kernels: packed top-k keys, per-query candidate buffers,
// exclusion lookups, and the SIMD block scorers chosen at run time.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace recjpq_cpu {

// Items per block of the scan layout: codes are stored [num_blocks, M, kBlock], so one split of one
// block is a contiguous run of kBlock codes (one cache line for uint8) feeding whole SIMD registers.
constexpr int64_t kBlock = 64;

// ---- packed keys: ordered score bits high, 2^32-1-index low (as recjpq/topk_keys.py) ----------

inline int32_t ordered_int32(float score) {
  score = score + 0.0f;  // folds -0.0 into +0.0 (not an identity under IEEE, so the compiler keeps it)
  int32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  return bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
}

inline int64_t pack_key(float score, int64_t index) {
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(ordered_int32(score))) << 32;
  return static_cast<int64_t>(high | (0xFFFFFFFFull - static_cast<uint64_t>(index)));
}

inline float key_score(int64_t key) {
  int32_t high = static_cast<int32_t>(key >> 32);
  high = high >= 0 ? high : high ^ 0x7FFFFFFF;
  float score;
  std::memcpy(&score, &high, sizeof score);
  return score;
}

inline int64_t key_index(int64_t key) { return 0xFFFFFFFFll - (key & 0xFFFFFFFFll); }

// Candidates of one query from one ascending scan of items. Scores below `threshold` cannot enter
// the top-k: once k candidates are kept, threshold is just above the k-th score, because any later
// item with an equal score has a higher index and loses the tie.
class AscendingTopK {
 public:
  // a shrink (nth_element over k + max(k / 4, 8) keys) every max(k / 4, 8) pushes: O(1) per push,
  // and the threshold follows the k-th best closely. With room for 64 more (until 2026-11-26) the
  // B = 1 scan of 1.27M items let 500 items through its filter to be rescored instead of 280.
  explicit AscendingTopK(int64_t k) : k_(k), capacity_(k + std::max<int64_t>(k / 4, 8)) {
    keys_.reserve(capacity_);
  }

  float threshold() const { return threshold_; }

  void push(float score, int64_t index) {
    if (score < threshold_) return;
    keys_.push_back(pack_key(score, index));
    if (static_cast<int64_t>(keys_.size()) >= capacity_) shrink();
  }

  const std::vector<int64_t>& keys() const { return keys_; }

  // Until k keys are kept the threshold is -inf and filters nothing; once at least k are pushed,
  // settle() makes it the k-th best now rather than at the next shrink. Returns whether it is finite.
  bool settle() {
    if (threshold_ == -std::numeric_limits<float>::infinity() && static_cast<int64_t>(keys_.size()) >= k_) shrink();
    return threshold_ > -std::numeric_limits<float>::infinity();
  }

 private:
  void shrink() {
    std::nth_element(keys_.begin(), keys_.begin() + (k_ - 1), keys_.end(), std::greater<int64_t>());
    keys_.resize(k_);
    threshold_ = std::nextafter(key_score(keys_[k_ - 1]), std::numeric_limits<float>::infinity());
  }

  int64_t k_, capacity_;
  float threshold_ = -std::numeric_limits<float>::infinity();
  std::vector<int64_t> keys_;
};

// The sorted non-negative ids of each query's exclude row, checked to lie in [-1, n) (ValueError).
class ExcludeLists {
 public:
  ExcludeLists(const c10::optional<at::Tensor>& exclude, int64_t batch, int64_t n);
  bool contains(int64_t query, int64_t item) const {
    if (lists_.empty()) return false;
    const auto& ids = lists_[query];
    return !ids.empty() && std::binary_search(ids.begin(), ids.end(), item);
  }
  // the query's excluded ids, sorted (duplicates kept)
  const std::vector<int64_t>& of(int64_t query) const {
    static const std::vector<int64_t> kNone;
    return lists_.empty() ? kNone : lists_[query];
  }

 private:
  std::vector<std::vector<int64_t>> lists_;
};

// Exact scores of `count` items from the blocked layout: items[i] points at item i's code in split 0
// (its code in split m is items[i][m * kBlock]); out[i] = S[0, code_0] + S[1, code_1] + ... in split
// order, float32, as the reference sums. Four items at a time: each is a chain of M dependent adds,
// and four chains keep the adder busy (pq_topk at M = 32, k = 100, N = 3,417, B = 1: 40 -> 32 us).
template <typename CodeT>
void exact_scores(const CodeT* const* items, int64_t count, const float* S, int64_t M, int64_t K, float* out) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const CodeT *c0 = items[i], *c1 = items[i + 1], *c2 = items[i + 2], *c3 = items[i + 3];
    float s0 = S[c0[0]], s1 = S[c1[0]], s2 = S[c2[0]], s3 = S[c3[0]];
    for (int64_t m = 1; m < M; ++m) {
      const float* Sm = S + m * K;
      const int64_t at = m * kBlock;
      s0 += Sm[c0[at]];
      s1 += Sm[c1[at]];
      s2 += Sm[c2[at]];
      s3 += Sm[c3[at]];
    }
    out[i] = s0;
    out[i + 1] = s1;
    out[i + 2] = s2;
    out[i + 3] = s3;
  }
  for (; i < count; ++i) {
    float s = S[items[i][0]];
    for (int64_t m = 1; m < M; ++m) s += S[m * K + items[i][m * kBlock]];
    out[i] = s;
  }
}

// Writes the best min(k, |keys|) keys of one query (descending) as values/indices, padding the
// tail with (-inf, -1). Reorders `keys`.
void write_topk(std::vector<int64_t>& keys, int64_t k, float* values, int64_t* indices);

// ---- SIMD block scorers ---------------------------------------------------------------------

enum class Simd { kScalar, kAvx2, kAvx512 };

bool simd_supported(Simd level);
// "auto" -> the best supported level; "scalar" | "avx2" | "avx512" -> that level, or an error
// saying the CPU (or the build's architecture) lacks it.
Simd parse_simd(const std::string& name);
const char* simd_name(Simd level);

// Scores `num_blocks` consecutive blocks ([num_blocks, M, kBlock] codes) for one query's table
// S [M, K]: out[j] = sum_m S[m, code[j, m]] summed in split order m = 0..M-1. If `masks` is not
// null, bit j of masks[b] says whether item j of block b scored >= threshold.
template <typename CodeT>
using ScoreBlocksFn = void (*)(const CodeT* blocks, int64_t num_blocks, int64_t M, const float* S, int64_t K,
                               float threshold, float* out, uint64_t* masks);

template <typename CodeT>
ScoreBlocksFn<CodeT> score_blocks_fn(Simd level);

// The bound filter for uint8 codes: with S quantised per query to bytes qtable [M, 256], sets bit j
// of masks[b] when item j of block b has sum_m qtable[m, code] >= threshold (a 16-bit sum). Sixty-four
// byte lookups take three AVX-512 VBMI instructions, so this scans ~8x faster than float gathers;
// items that pass are rescored exactly. Returns the OR of the masks (after the first few chunks almost
// always 0, and the caller skips the blocks). Null where the CPU lacks AVX-512 VBMI.
using FilterBlocksFn = uint64_t (*)(const uint8_t* blocks, int64_t num_blocks, int64_t M, const uint8_t* qtable,
                                    uint16_t threshold, uint64_t* masks);
FilterBlocksFn filter_blocks_fn(Simd level);

// The filter's per-query byte table, vectorised (the CPUs that run the filter have AVX-512), and
// null where the filter is. ranges: lo[m], hi[m] = min and max of S[m, :K]. quantize: out[m * 256 + c]
// = min(255, trunc((S[m, c] - lo[m]) * inverse + 0.5)) in float, for a finite `inverse`.
struct ByteTableFns {
  void (*ranges)(const float* S, int64_t M, int64_t K, float* lo, float* hi);
  void (*quantize)(const float* S, int64_t M, int64_t K, const float* lo, float inverse, uint8_t* out);
};
ByteTableFns byte_table_fns(Simd level);

// The sub-item score table of `batch` queries [batch, M * dsub] against centroids [M, K, dsub]:
// S[b, m, k] = the dot product of query[b, m-th chunk] and centroids[m, k] in one fixed order of
// float32 operations (eight fma lane sums, then a tree: dot8_scalar in pq_simd.cpp). Every SIMD
// level gives these bits; the scalar path is the reference of the vector one.
// Up to kSmallSplit dimensions per split the vector paths work across sub-ids (16 per AVX-512
// register) rather than across dimensions: fast enough to replace the batched matmul at any batch.
constexpr int64_t kSmallSplit = 8;
using SubitemScoresFn = void (*)(const float* query, int64_t batch, const float* centroids, int64_t M, int64_t K,
                                 int64_t dsub, float* S);
SubitemScoresFn subitem_scores_fn(Simd level);
// subitem_scores_fn's table for d/M <= kSmallSplit from centroids already transposed to [M, d/M, K]
// (centroids_t replaces the centroids argument): the same bits, without a transposition per call.
SubitemScoresFn subitem_scores_transposed_fn(Simd level);
// The table of `batch` queries with subitem_scores_fn(level), large batches shared among threads.
void subitem_scores_into(Simd level, const float* query, int64_t batch, const float* centroids, int64_t M, int64_t K,
                         int64_t dsub, float* S);

// out[i] = sum_j q[j] table[j * n + i] for i < n, summed in any order (the decoded path's approximate
// scores, whose error its margin bounds): for a few queries it beats the BLAS call, which pays its
// dispatch and threading for a product of microseconds. AVX-512 only (null elsewhere: BLAS then).
using GemvFn = void (*)(const float* q, int64_t d, const float* table, int64_t n, float* out);
GemvFn gemv_fn(Simd level);

// Bit j says whether x[j] >= threshold, for the kBlock floats at x (a nan is never above).
using AboveFn = uint64_t (*)(const float* x, float threshold);
AboveFn above_fn(Simd level);

// Calls fn(CodeT{}) with CodeT matching the codes dtype (uint8, int16, int32).
template <typename Fn>
auto dispatch_codes(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kByte: return fn(uint8_t{});
    case at::kShort: return fn(int16_t{});
    case at::kInt: return fn(int32_t{});
    default: TORCH_CHECK(false, "recjpq_cpu: codes must be uint8, int16 or int32, got ", dtype);
  }
}

// The exhaustive top-k scan (torch.ops.recjpq_cpu.pq_topk) of S [B, M, K] over the blocked codes
// of N items; checks S finite and the exclusion ids in range (ValueError) on the data it scans.
std::tuple<at::Tensor, at::Tensor> pq_topk(const at::Tensor& S, const at::Tensor& blocked, int64_t n, int64_t k,
                                           const c10::optional<at::Tensor>& exclude, c10::string_view simd);

// recjpq.ops.pq_topk_query's "matmul" algorithm (pq_topk_decoded.cpp): the GEMM of the float32
// queries with the decoded table [d, N], then each query's exact top-k from S over the items the
// GEMM's error margin cannot rule out. S: subitem_scores's table, or none for d/M <= kSmallSplit
// (computed here from centroids_t, the centroids transposed to [M, d/M, K]). Same checks and
// result as pq_topk on S.
std::tuple<at::Tensor, at::Tensor> pq_topk_decoded(const at::Tensor& query, const at::Tensor& centroids_t,
                                                   const c10::optional<at::Tensor>& S, const at::Tensor& table,
                                                   const at::Tensor& abs_max, const at::Tensor& blocked, int64_t n,
                                                   int64_t k, const c10::optional<at::Tensor>& exclude,
                                                   c10::string_view simd);

// A float32 buffer of the calling thread, reused across calls (slot 0: the batched matmul's table,
// 1: S, 2: the GEMM's scores): a fresh table of a few hundred KB costs a page fault per 4 KB page.
at::Tensor workspace(int slot, at::IntArrayRef sizes);

void check_table(const at::Tensor& S, int64_t M);
// ValueError if S holds a nan or inf: the top-k kernels check the very table they then scan, so
// recjpq.ops skips its Python pass over S for them.
void check_finite(const at::Tensor& S);
// The blocked layout of N items that block_codes returns: contiguous [ceil(N / kBlock), M, kBlock].
void check_blocked(const at::Tensor& blocked, int64_t n);

}  // namespace recjpq_cpu
