// Block scorers for the blocked code layout, one per SIMD level. The AVX2 and AVX-512 versions are
// compiled with function target attributes and picked at run time from cpuid, so the extension
// needs no -march flag and still runs on any x86-64 (and, scalar only, on aarch64).
#include "pq_common.h"

#if defined(__x86_64__) || defined(_M_X64)
#define RECJPQ_X86 1
#include <immintrin.h>
#endif

namespace recjpq_cpu {

bool simd_supported(Simd level) {
  switch (level) {
    case Simd::kScalar: return true;
#ifdef RECJPQ_X86
    case Simd::kAvx2: return __builtin_cpu_supports("avx2");
    case Simd::kAvx512: return __builtin_cpu_supports("avx512f");
#endif
    default: return false;
  }
}

const char* simd_name(Simd level) {
  switch (level) {
    case Simd::kAvx2: return "avx2";
    case Simd::kAvx512: return "avx512";
    default: return "scalar";
  }
}

Simd parse_simd(const std::string& name) {
  if (name == "auto") {
    for (Simd level : {Simd::kAvx512, Simd::kAvx2}) {
      if (simd_supported(level)) return level;
    }
    return Simd::kScalar;
  }
  for (Simd level : {Simd::kScalar, Simd::kAvx2, Simd::kAvx512}) {
    if (name == simd_name(level)) {
      TORCH_CHECK(simd_supported(level), "recjpq_cpu: SIMD path '", name,
                  "' was forced but this CPU (or build architecture) does not support it");
      return level;
    }
  }
  TORCH_CHECK(false, "recjpq_cpu: SIMD path must be auto, scalar, avx2 or avx512, got '", name, "'");
}

namespace {

template <typename CodeT>
void score_blocks_scalar(const CodeT* blocks, int64_t num_blocks, int64_t M, const float* S, int64_t K,
                         float threshold, float* out, uint64_t* masks) {
  for (int64_t b = 0; b < num_blocks; ++b) {
    const CodeT* codes = blocks + b * M * kBlock;
    float* acc = out + b * kBlock;
    for (int64_t j = 0; j < kBlock; ++j) acc[j] = S[codes[j]];
    for (int64_t m = 1; m < M; ++m) {
      const CodeT* cm = codes + m * kBlock;
      const float* Sm = S + m * K;
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += Sm[cm[j]];
    }
    if (masks) {
      uint64_t mask = 0;
      for (int64_t j = 0; j < kBlock; ++j) mask |= static_cast<uint64_t>(acc[j] >= threshold) << j;
      masks[b] = mask;
    }
  }
}

#ifdef RECJPQ_X86

// ---- AVX2: 8 items per gather ----
__attribute__((target("avx2"))) inline __m256i indices8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2"))) inline __m256i indices8(const int16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx2"))) inline __m256i indices8(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

template <typename CodeT>
__attribute__((target("avx2"))) void score_blocks_avx2(const CodeT* blocks, int64_t num_blocks, int64_t M,
                                                       const float* S, int64_t K, float threshold, float* out,
                                                       uint64_t* masks) {
  constexpr int kLanes = 8, kRegs = kBlock / kLanes;
  const __m256 thr = _mm256_set1_ps(threshold);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const CodeT* codes = blocks + b * M * kBlock;
    __m256 acc[kRegs];
    for (int r = 0; r < kRegs; ++r) acc[r] = _mm256_i32gather_ps(S, indices8(codes + r * kLanes), 4);
    for (int64_t m = 1; m < M; ++m) {
      const CodeT* cm = codes + m * kBlock;
      const float* Sm = S + m * K;
      for (int r = 0; r < kRegs; ++r)
        acc[r] = _mm256_add_ps(acc[r], _mm256_i32gather_ps(Sm, indices8(cm + r * kLanes), 4));
    }
    uint64_t mask = 0;
    for (int r = 0; r < kRegs; ++r) {
      _mm256_storeu_ps(out + b * kBlock + r * kLanes, acc[r]);
      mask |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[r], thr, _CMP_GE_OQ))) << (r * kLanes);
    }
    if (masks) masks[b] = mask;
  }
}

// ---- AVX-512: 16 items per gather ----
__attribute__((target("avx512f"))) inline __m512i indices16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx512f"))) inline __m512i indices16(const int16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
__attribute__((target("avx512f"))) inline __m512i indices16(const int32_t* p) {
  return _mm512_loadu_si512(p);
}

template <typename CodeT>
__attribute__((target("avx512f"))) void score_blocks_avx512(const CodeT* blocks, int64_t num_blocks, int64_t M,
                                                           const float* S, int64_t K, float threshold, float* out,
                                                           uint64_t* masks) {
  constexpr int kLanes = 16, kRegs = kBlock / kLanes;
  const __m512 thr = _mm512_set1_ps(threshold);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const CodeT* codes = blocks + b * M * kBlock;
    __m512 acc[kRegs];
    for (int r = 0; r < kRegs; ++r) acc[r] = _mm512_i32gather_ps(indices16(codes + r * kLanes), S, 4);
    for (int64_t m = 1; m < M; ++m) {
      const CodeT* cm = codes + m * kBlock;
      const float* Sm = S + m * K;
      for (int r = 0; r < kRegs; ++r)
        acc[r] = _mm512_add_ps(acc[r], _mm512_i32gather_ps(indices16(cm + r * kLanes), Sm, 4));
    }
    uint64_t mask = 0;
    for (int r = 0; r < kRegs; ++r) {
      _mm512_storeu_ps(out + b * kBlock + r * kLanes, acc[r]);
      mask |= static_cast<uint64_t>(_mm512_cmp_ps_mask(acc[r], thr, _CMP_GE_OQ)) << (r * kLanes);
    }
    if (masks) masks[b] = mask;
  }
}

// ---- AVX-512 VBMI: 64 byte lookups into a 256-entry table per three instructions ----
// R blocks per pass, so that each split's four table registers are loaded once for R x 64 items:
// with one block per pass the loads, not the permutes, set the pace (0.30 against 0.23 ns an item
// for R = 4 on Zen 4; R = 2 and 8 were slower than 4).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vbmi,bmi2"), always_inline)) inline void filter_pass_vbmi(
    const uint8_t* codes, int64_t M, const uint8_t* qtable, __m512i thr, uint64_t* masks) {
  const __m512i low_byte = _mm512_set1_epi16(0xFF);
  __m512i even[R], odd[R];  // 16-bit totals of the block's even and odd items (in-lane, no shuffles)
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_si512();
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* t = qtable + m * 256;
    const __m512i t0 = _mm512_loadu_si512(t), t1 = _mm512_loadu_si512(t + 64), t2 = _mm512_loadu_si512(t + 128),
                  t3 = _mm512_loadu_si512(t + 192);
    for (int r = 0; r < R; ++r) {
      const __m512i idx = _mm512_loadu_si512(codes + (r * M + m) * kBlock);
      const __m512i v = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), _mm512_permutex2var_epi8(t0, idx, t1),
                                               _mm512_permutex2var_epi8(t2, idx, t3));
      even[r] = _mm512_add_epi16(even[r], _mm512_and_si512(v, low_byte));
      odd[r] = _mm512_add_epi16(odd[r], _mm512_srli_epi16(v, 8));
    }
  }
  for (int r = 0; r < R; ++r)
    masks[r] = _pdep_u64(_mm512_cmpge_epu16_mask(even[r], thr), 0x5555555555555555ull) |
               _pdep_u64(_mm512_cmpge_epu16_mask(odd[r], thr), 0xAAAAAAAAAAAAAAAAull);
}

__attribute__((target("avx512f,avx512bw,avx512vbmi,bmi2"))) uint64_t filter_blocks_vbmi(
    const uint8_t* blocks, int64_t num_blocks, int64_t M, const uint8_t* qtable, uint16_t threshold,
    uint64_t* masks) {
  constexpr int kPass = 4;
  const __m512i thr = _mm512_set1_epi16(static_cast<short>(threshold));
  int64_t b = 0;
  for (; b + kPass <= num_blocks; b += kPass) filter_pass_vbmi<kPass>(blocks + b * M * kBlock, M, qtable, thr, masks + b);
  for (; b < num_blocks; ++b) filter_pass_vbmi<1>(blocks + b * M * kBlock, M, qtable, thr, masks + b);
  uint64_t any = 0;
  for (b = 0; b < num_blocks; ++b) any |= masks[b];
  return any;
}

// ---- AVX-512: the filter's byte table ----
__attribute__((target("avx512f"))) void split_ranges_avx512(const float* S, int64_t M, int64_t K, float* lo,
                                                           float* hi) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = S + m * K;
    __m512 mn = _mm512_set1_ps(std::numeric_limits<float>::infinity()), mx = _mm512_sub_ps(_mm512_setzero_ps(), mn);
    int64_t c = 0;
    for (; c + 16 <= K; c += 16) {
      const __m512 v = _mm512_loadu_ps(row + c);
      mn = _mm512_min_ps(mn, v);
      mx = _mm512_max_ps(mx, v);
    }
    float low = _mm512_reduce_min_ps(mn), high = _mm512_reduce_max_ps(mx);
    for (; c < K; ++c) {
      low = std::min(low, row[c]);
      high = std::max(high, row[c]);
    }
    lo[m] = low;
    hi[m] = high;
  }
}

__attribute__((target("avx512f"))) void quantize_avx512(const float* S, int64_t M, int64_t K, const float* lo,
                                                       float inverse, uint8_t* out) {
  const __m512 scale = _mm512_set1_ps(inverse), half = _mm512_set1_ps(0.5f), top = _mm512_set1_ps(255.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = S + m * K;
    uint8_t* bytes = out + m * 256;
    const __m512 base = _mm512_set1_ps(lo[m]);
    int64_t c = 0;
    for (; c + 16 <= K; c += 16) {
      const __m512 x = _mm512_min_ps(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(row + c), base), scale, half), top);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bytes + c), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(x)));
    }
    for (; c < K; ++c) {
      const float x = std::min((row[c] - lo[m]) * inverse + 0.5f, 255.0f);
      bytes[c] = static_cast<uint8_t>(x);
    }
  }
}

#endif  // RECJPQ_X86

// One dot product of S, in the order every path follows: eight lane sums, lane l taking
// j = l, l + 8, l + 16, ... with one fma each, then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
// Eight lanes of one AVX register do the lane sums, and horizontal adds of eight rows' lanes give
// that tree, so the vector path needs no transposition and the scalar path is its reference.
float dot8_scalar(const float* q, const float* c, int64_t dsub) {
  float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t j = 0; j < dsub; ++j) lane[j % 8] = std::fma(q[j], c[j], lane[j % 8]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

void subitem_scores_scalar(const float* query, int64_t batch, const float* centroids, int64_t M, int64_t K,
                           int64_t dsub, float* S) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k)
        S[(b * M + m) * K + k] = dot8_scalar(query + (b * M + m) * dsub, centroids + (m * K + k) * dsub, dsub);
    }
  }
}

#ifdef RECJPQ_X86

// lanes of q . c for one row c: j-chunks of 8, one fma per chunk; in the last, partial chunk the
// lanes past d/M keep their sums (an fma with 0 would turn a -0 lane into +0, unlike dot8_scalar)
__attribute__((target("avx2,fma"))) inline __m256 lanes8(const float* q, const float* c, int64_t full, __m256i tail) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j < full; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(c + j), acc);
  if (_mm256_testz_si256(tail, tail)) return acc;
  const __m256 last = _mm256_fmadd_ps(_mm256_maskload_ps(q + j, tail), _mm256_maskload_ps(c + j, tail), acc);
  return _mm256_blendv_ps(acc, last, _mm256_castsi256_ps(tail));
}

// out[r] = the tree of the eight lanes of rows[r], r = 0..7 (hadd pairs neighbouring lanes)
__attribute__((target("avx2,fma"))) inline __m256 tree8(const __m256* rows) {
  const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(rows[0], rows[1]), _mm256_hadd_ps(rows[2], rows[3]));
  const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(rows[4], rows[5]), _mm256_hadd_ps(rows[6], rows[7]));
  // g0 = [t0(l0..3), t1(l0..3), t2(l0..3), t3(l0..3) | t0(l4..7), t1(l4..7), ...], likewise g1 for rows 4..7
  const __m256 low = _mm256_permute2f128_ps(g0, g1, 0x20), high = _mm256_permute2f128_ps(g0, g1, 0x31);
  return _mm256_add_ps(low, high);
}

// lanes8 and tree8 for one split of one query, with d/M = 8 x CHUNKS a template argument so that the
// query's chunks stay in registers: at d/M = 64 the loop otherwise loads them again for every row
// (9.3 against 4.8 us for M = 8, K = 256 on Zen 4), the same fmas in the same order
template <int CHUNKS>
__attribute__((target("avx2,fma"))) void split_scores_avx2(const float* q, const float* cm, int64_t K, float* out) {
  constexpr int64_t kDsub = 8 * CHUNKS;
  __m256 qv[CHUNKS];
  for (int i = 0; i < CHUNKS; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 rows[8];
    for (int r = 0; r < 8; ++r) {
      const float* c = cm + (k + r) * kDsub;
      __m256 acc = _mm256_setzero_ps();
      for (int i = 0; i < CHUNKS; ++i) acc = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(c + 8 * i), acc);
      rows[r] = acc;
    }
    _mm256_storeu_ps(out + k, tree8(rows));
  }
  for (; k < K; ++k) out[k] = dot8_scalar(q, cm + k * kDsub, kDsub);
}

__attribute__((target("avx2,fma"))) void subitem_scores_avx2(const float* query, int64_t batch,
                                                            const float* centroids, int64_t M, int64_t K,
                                                            int64_t dsub, float* S) {
  using SplitFn = void (*)(const float*, const float*, int64_t, float*);
  // from two chunks: d/M <= 8 takes scores_by_code (subitem_scores_any_*)
  static constexpr SplitFn kByChunks[] = {nullptr,
                                          nullptr,                &split_scores_avx2<2>,  &split_scores_avx2<3>,
                                          &split_scores_avx2<4>,  &split_scores_avx2<5>,  &split_scores_avx2<6>,
                                          &split_scores_avx2<7>,  &split_scores_avx2<8>,  &split_scores_avx2<9>,
                                          &split_scores_avx2<10>, &split_scores_avx2<11>, &split_scores_avx2<12>,
                                          &split_scores_avx2<13>, &split_scores_avx2<14>, &split_scores_avx2<15>,
                                          &split_scores_avx2<16>};
  constexpr int64_t kMaxChunks = sizeof(kByChunks) / sizeof(kByChunks[0]) - 1;
  const SplitFn by_chunks = dsub % 8 == 0 && dsub / 8 <= kMaxChunks ? kByChunks[dsub / 8] : nullptr;
  const int64_t full = dsub / 8 * 8;
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(dsub - full)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      const float* q = query + (b * M + m) * dsub;
      const float* cm = centroids + m * K * dsub;
      float* out = S + (b * M + m) * K;
      if (by_chunks) {
        by_chunks(q, cm, K, out);
        continue;
      }
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 rows[8];
        for (int r = 0; r < 8; ++r) rows[r] = lanes8(q, cm + (k + r) * dsub, full, tail);
        _mm256_storeu_ps(out + k, tree8(rows));
      }
      for (; k < K; ++k) out[k] = dot8_scalar(q, cm + k * dsub, dsub);
    }
  }
}

// dot8_scalar for every query, vectorised across sub-ids instead of dimensions: for d/M <= 8
// (kSmallSplit) the lanes of lanes8 would sit mostly idle. Each split's centroids are transposed to
// [dsub, K] (at most 8 KB at K = 256, reused by every query), so lane l of WIDTH sub-ids is one
// register: the lane sums and the tree are dot8_scalar's operations in its order, per sub-id. DSUB
// is a template argument so that the lanes stay in registers. A macro, not a template over the
// width, because each width needs its own target attribute on the whole loop.
#define RECJPQ_SCORES_BY_CODE(NAME, TARGET, V, WIDTH, ZERO, SET1, LOADU, STOREU, ADD, FMA)                     \
  template <int DSUB>                                                                                            \
  __attribute__((target(TARGET))) void NAME##_split(const float* query, int64_t batch, int64_t M, int64_t m,     \
                                                    const float* cT, int64_t K, float* S) {                      \
    for (int64_t b = 0; b < batch; ++b) {                                                                        \
      const float* q = query + (b * M + m) * DSUB;                                                               \
      float* out = S + (b * M + m) * K;                                                                          \
      V qj[DSUB];                                                                                                \
      for (int j = 0; j < DSUB; ++j) qj[j] = SET1(q[j]);                                                         \
      int64_t k = 0;                                                                                             \
      for (; k + WIDTH <= K; k += WIDTH) {                                                                       \
        V lane[8];                                                                                               \
        for (int l = 0; l < 8; ++l) lane[l] = ZERO();                                                            \
        for (int j = 0; j < DSUB; ++j) lane[j] = FMA(qj[j], LOADU(cT + j * K + k), lane[j]);                     \
        STOREU(out + k, ADD(ADD(ADD(lane[0], lane[1]), ADD(lane[2], lane[3])),                                   \
                            ADD(ADD(lane[4], lane[5]), ADD(lane[6], lane[7]))));                                 \
      }                                                                                                          \
      for (; k < K; ++k) {                                                                                       \
        float c[DSUB];                                                                                           \
        for (int j = 0; j < DSUB; ++j) c[j] = cT[j * K + k];                                                     \
        out[k] = dot8_scalar(q, c, DSUB);                                                                        \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
  __attribute__((target(TARGET))) void NAME(const float* query, int64_t batch, const float* centroids, int64_t M, \
                                            int64_t K, int64_t dsub, float* S) {                                 \
    using SplitFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*);           \
    static constexpr SplitFn kSplit[kSmallSplit] = {&NAME##_split<1>, &NAME##_split<2>, &NAME##_split<3>,        \
                                                   &NAME##_split<4>, &NAME##_split<5>, &NAME##_split<6>,         \
                                                   &NAME##_split<7>, &NAME##_split<8>};                          \
    thread_local std::vector<float> transposed;                                                                  \
    transposed.resize(dsub * K);                                                                                 \
    float* cT = transposed.data();                                                                               \
    for (int64_t m = 0; m < M; ++m) {                                                                            \
      const float* cm = centroids + m * K * dsub;                                                                \
      for (int64_t k = 0; k < K; ++k)                                                                            \
        for (int64_t j = 0; j < dsub; ++j) cT[j * K + k] = cm[k * dsub + j];                                     \
      kSplit[dsub - 1](query, batch, M, m, cT, K, S);                                                            \
    }                                                                                                            \
  }                                                                                                              \
  __attribute__((target(TARGET))) void NAME##_t(const float* query, int64_t batch, const float* centroids_t,     \
                                                int64_t M, int64_t K, int64_t dsub, float* S) {                  \
    using SplitFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*);           \
    static constexpr SplitFn kSplit[kSmallSplit] = {&NAME##_split<1>, &NAME##_split<2>, &NAME##_split<3>,        \
                                                   &NAME##_split<4>, &NAME##_split<5>, &NAME##_split<6>,         \
                                                   &NAME##_split<7>, &NAME##_split<8>};                          \
    for (int64_t m = 0; m < M; ++m) kSplit[dsub - 1](query, batch, M, m, centroids_t + m * dsub * K, K, S);      \
  }

RECJPQ_SCORES_BY_CODE(scores_by_code_avx2, "avx2,fma", __m256, 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps,
                      _mm256_storeu_ps, _mm256_add_ps, _mm256_fmadd_ps)
RECJPQ_SCORES_BY_CODE(scores_by_code_avx512, "avx512f", __m512, 16, _mm512_setzero_ps, _mm512_set1_ps,
                      _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps, _mm512_fmadd_ps)
#undef RECJPQ_SCORES_BY_CODE

__attribute__((target("avx2,fma"))) void subitem_scores_any_avx2(const float* query, int64_t batch,
                                                                const float* centroids, int64_t M, int64_t K,
                                                                int64_t dsub, float* S) {
  if (dsub <= kSmallSplit) return scores_by_code_avx2(query, batch, centroids, M, K, dsub, S);
  subitem_scores_avx2(query, batch, centroids, M, K, dsub, S);
}

__attribute__((target("avx512f,avx2,fma"))) void subitem_scores_any_avx512(const float* query, int64_t batch,
                                                                          const float* centroids, int64_t M,
                                                                          int64_t K, int64_t dsub, float* S) {
  if (dsub <= kSmallSplit) return scores_by_code_avx512(query, batch, centroids, M, K, dsub, S);
  subitem_scores_avx2(query, batch, centroids, M, K, dsub, S);
}

__attribute__((target("avx2"))) uint64_t above_avx2(const float* x, float threshold) {
  const __m256 t = _mm256_set1_ps(threshold);
  uint64_t mask = 0;
  for (int r = 0; r < 8; ++r)
    mask |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8 * r), t, _CMP_GE_OQ)))
            << (8 * r);
  return mask;
}

__attribute__((target("avx512f"))) uint64_t above_avx512(const float* x, float threshold) {
  const __m512 t = _mm512_set1_ps(threshold);
  uint64_t mask = 0;
  for (int r = 0; r < 4; ++r)
    mask |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + 16 * r), t, _CMP_GE_OQ)) << (16 * r);
  return mask;
}

// 64 items per tile: four accumulators, one table row segment per dimension (rows are n apart)
__attribute__((target("avx512f"))) void gemv_avx512(const float* q, int64_t d, const float* table, int64_t n,
                                                    float* out) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; ++j) {
      const __m512 qj = _mm512_set1_ps(q[j]);
      const float* row = table + j * n + i;
      a0 = _mm512_fmadd_ps(qj, _mm512_loadu_ps(row), a0);
      a1 = _mm512_fmadd_ps(qj, _mm512_loadu_ps(row + 16), a1);
      a2 = _mm512_fmadd_ps(qj, _mm512_loadu_ps(row + 32), a2);
      a3 = _mm512_fmadd_ps(qj, _mm512_loadu_ps(row + 48), a3);
    }
    _mm512_storeu_ps(out + i, a0);
    _mm512_storeu_ps(out + i + 16, a1);
    _mm512_storeu_ps(out + i + 32, a2);
    _mm512_storeu_ps(out + i + 48, a3);
  }
  for (; i < n; i += 16) {
    const __mmask16 live = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(q[j]), _mm512_maskz_loadu_ps(live, table + j * n + i), acc);
    _mm512_mask_storeu_ps(out + i, live, acc);
  }
}

#endif  // RECJPQ_X86

void subitem_scores_transposed_scalar(const float* query, int64_t batch, const float* centroids_t, int64_t M,
                                      int64_t K, int64_t dsub, float* S) {
  float c[kSmallSplit];
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < dsub; ++j) c[j] = centroids_t[(m * dsub + j) * K + k];
        S[(b * M + m) * K + k] = dot8_scalar(query + (b * M + m) * dsub, c, dsub);
      }
    }
  }
}

uint64_t above_scalar(const float* x, float threshold) {
  uint64_t mask = 0;
  for (int64_t j = 0; j < kBlock; ++j) mask |= static_cast<uint64_t>(x[j] >= threshold) << j;
  return mask;
}

}  // namespace

GemvFn gemv_fn(Simd level) {
#ifdef RECJPQ_X86
  if (level == Simd::kAvx512) return &gemv_avx512;
#endif
  (void)level;
  return nullptr;
}

SubitemScoresFn subitem_scores_transposed_fn(Simd level) {
#ifdef RECJPQ_X86
  if (level == Simd::kAvx512) return &scores_by_code_avx512_t;
  if (level == Simd::kAvx2 && __builtin_cpu_supports("fma")) return &scores_by_code_avx2_t;
#endif
  (void)level;
  return &subitem_scores_transposed_scalar;
}

AboveFn above_fn(Simd level) {
  switch (level) {
#ifdef RECJPQ_X86
    case Simd::kAvx512: return &above_avx512;
    case Simd::kAvx2: return &above_avx2;
#endif
    default: return &above_scalar;
  }
}

SubitemScoresFn subitem_scores_fn(Simd level) {
#ifdef RECJPQ_X86
  // one order at every level: AVX-512 runs the AVX2 lane code for d/M > 8 (its CPUs have AVX2 and
  // FMA) and 16 sub-ids per register for d/M <= 8
  if (level == Simd::kAvx512 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return &subitem_scores_any_avx512;
  if (level != Simd::kScalar && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return &subitem_scores_any_avx2;
#endif
  (void)level;
  return &subitem_scores_scalar;
}

ByteTableFns byte_table_fns(Simd level) {
#ifdef RECJPQ_X86
  if (filter_blocks_fn(level) != nullptr) return {&split_ranges_avx512, &quantize_avx512};
#endif
  (void)level;
  return {nullptr, nullptr};
}

FilterBlocksFn filter_blocks_fn(Simd level) {
#ifdef RECJPQ_X86
  if (level == Simd::kAvx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi") &&
      __builtin_cpu_supports("bmi2"))
    return &filter_blocks_vbmi;
#endif
  (void)level;
  return nullptr;
}

template <typename CodeT>
ScoreBlocksFn<CodeT> score_blocks_fn(Simd level) {
  switch (level) {
#ifdef RECJPQ_X86
    case Simd::kAvx512: return &score_blocks_avx512<CodeT>;
    case Simd::kAvx2: return &score_blocks_avx2<CodeT>;
#endif
    default: return &score_blocks_scalar<CodeT>;
  }
}

template ScoreBlocksFn<uint8_t> score_blocks_fn<uint8_t>(Simd);
template ScoreBlocksFn<int16_t> score_blocks_fn<int16_t>(Simd);
template ScoreBlocksFn<int32_t> score_blocks_fn<int32_t>(Simd);

}  // namespace recjpq_cpu
