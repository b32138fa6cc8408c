// recjpq.ops.pq_topk_query's "matmul" algorithm on CPU: one float32 GEMM of the queries with the
// decoded item table, then per query an exact top-k from the few items the GEMM cannot rule out.
//
// The GEMM sums in BLAS's order, so its scores a_i differ from the exact S sums x_i (splits added
// in order, the reference's values) by at most margin_b (decoded_margin). With L a lower bound of
// the k-th best approximate score of the query's allowed items (kth_lower_bound), k of them have
// x >= L - margin, so the exact k-th best is at least that, and every item reaching it (ties
// included) has a >= L - 2 margin. Those items are rescored from S and the best k kept with the
// scan's tie order. Where the margin cannot be trusted (|scores| near float32 overflow) every
// allowed item is rescored. With d/M <= 8 an entry of S does not depend on the batch around it
// (subitem_scores_fn), so S is computed here, a chunk of queries at a time, from the centroids
// transposed to [M, d/M, K]; otherwise the caller passes subitem_scores's table. The codes are the
// caller's range-checked snapshot (blocked), as for pq_topk.
#include "pq_common.h"

#include "work_sharing.h"

namespace recjpq_cpu {
namespace {

constexpr int64_t kGemvRows = 4;  // queries per chunk up to which the GEMM is gemv_fn's, row by row
constexpr double kUnit = 1.0 / (1 << 23);  // float32 error per operation, twice round-to-nearest's
constexpr double kSafeBound = 1267650600228229401496703205376.0;  // 2^100: no float32 partial sum overflows below it

// A lower bound of the k-th best of row[0, n): the k-th best of the maxima of `width` >= k strided
// columns (column j holds items j, j + width, ...), k distinct items reaching it. With width = 4k
// about 1.15k items of random scores reach it. -inf where fewer than k columns hold a finite score.
float kth_lower_bound(const float* row, int64_t n, int64_t k, std::vector<float>& columns) {
  const int64_t width = std::min(n, (4 * k + 15) / 16 * 16);
  columns.assign(row, row + width);
  float* col = columns.data();
  int64_t i = width;
  for (; i + width <= n; i += width) {
    for (int64_t j = 0; j < width; ++j) col[j] = std::max(col[j], row[i + j]);
  }
  for (int64_t j = 0; i + j < n; ++j) col[j] = std::max(col[j], row[i + j]);
  std::nth_element(columns.begin(), columns.begin() + (k - 1), columns.end(), std::greater<float>());
  return columns[k - 1];
}

// Each query's exact top-k of one chunk: rows [b0, b0 + rows) of the batch, approx and S holding
// the chunk's rows only. approx is scratch: excluded items are set to -inf in it.
template <typename CodeT>
void select_chunk(float* approx, const float* S, const CodeT* codes, int64_t n, int64_t M, int64_t K, int64_t k,
                  int64_t b0, int64_t rows, const double* margin, const ExcludeLists& excluded, AboveFn above,
                  float* values, int64_t* indices) {
  auto query_topk = [&](int64_t r, int) {
    const int64_t q = b0 + r;
    float* row = approx + r * n;
    const float* Sq = S + r * M * K;
    constexpr float kNone = -std::numeric_limits<float>::infinity();
    for (int64_t i : excluded.of(q)) row[i] = kNone;
    thread_local std::vector<float> columns;
    const float bound = margin[2 * q + 1] < kSafeBound ? kth_lower_bound(row, n, k, columns) : kNone;
    AscendingTopK exact(k);
    // candidates are rescored in groups of up to kBlock, in ascending order (exact_scores)
    const CodeT* items[kBlock];
    int64_t ids[kBlock], count = 0;
    float scores[kBlock];
    auto flush = [&] {
      exact_scores(items, count, Sq, M, K, scores);
      for (int64_t c = 0; c < count; ++c) exact.push(scores[c], ids[c]);
      count = 0;
    };
    auto rescore = [&](int64_t i) {
      items[count] = codes + (i / kBlock) * M * kBlock + i % kBlock;
      ids[count++] = i;
      if (count == kBlock) flush();
    };
    if (bound == kNone) {  // no trusted margin (the GEMM may have overflowed) or few allowed items: all of them
      for (int64_t i = 0; i < n; ++i) {
        if (!excluded.contains(q, i)) rescore(i);
      }
    } else {  // the items within 2 margins of the bound (a finite cut: excluded items stay out)
      const double exact_cut = static_cast<double>(bound) - 2.0 * margin[2 * q];
      float cut = static_cast<float>(exact_cut);  // rounded down: the walk may only take more items
      if (static_cast<double>(cut) > exact_cut) cut = std::nextafter(cut, kNone);
      int64_t i = 0;
      for (; i + kBlock <= n; i += kBlock) {
        for (uint64_t mask = above(row + i, cut); mask; mask &= mask - 1) rescore(i + __builtin_ctzll(mask));
      }
      for (; i < n; ++i) {
        if (row[i] >= cut) rescore(i);
      }
    }
    flush();
    std::vector<int64_t> keys = exact.keys();
    write_topk(keys, k, values + q * k, indices + q * k);
  };
  run_units(rows, 0, query_topk);
}

}  // namespace

// Per query, (margin, A) with A_b = sum_j |q_bj| max_k |centroids[., k, j]| bounding
// sum_j |q_bj item_ij|, and margin bounding |GEMM score - S sum| for every item. The GEMM's d
// products and additions (any order) err by d u relative to A_b, to first order; S's dot products
// by d/M u and its float32 split sum by M u; 3 casts (float64 / float16 inputs); 2% covers the
// second-order terms (d u <= 2^-8). A < 2^100 also says that the query and the centroids are
// finite (a nan or inf makes A nan or inf) and that no S entry or sum overflows.
std::vector<double> margins_of(const float* query, int64_t batch, const double* abs_max, int64_t M, int64_t d) {
  const int64_t dsub = d / M;
  const double factor = 1.02 * static_cast<double>(M * dsub + dsub + M + 3) * kUnit;
  std::vector<double> out(2 * batch);
  for (int64_t b = 0; b < batch; ++b) {
    double bound = 0.0;
    for (int64_t j = 0; j < d; ++j) bound += std::fabs(static_cast<double>(query[b * d + j])) * abs_max[j];
    out[2 * b] = factor * bound;
    out[2 * b + 1] = bound;
  }
  return out;
}

void check_abs_max(const at::Tensor& abs_max, int64_t d) {
  TORCH_CHECK(abs_max.device().is_cpu() && abs_max.scalar_type() == at::kDouble && abs_max.dim() == 1 &&
                  abs_max.size(0) == d && abs_max.is_contiguous(),
              "recjpq_cpu: abs_max must be contiguous float64 [d]");
}

// margins_of as a tensor [B, 2] (tests check it against float64 truth)
at::Tensor decoded_margin(const at::Tensor& query, const at::Tensor& abs_max, int64_t M) {
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == at::kFloat && query.dim() == 2 && query.is_contiguous(),
              "recjpq_cpu: query must be a contiguous float32 CPU tensor [B, d]");
  const int64_t batch = query.size(0), d = query.size(1);
  check_abs_max(abs_max, d);
  TORCH_CHECK(M >= 1 && d % M == 0, "recjpq_cpu: d must be a multiple of M");
  const std::vector<double> margins = margins_of(query.data_ptr<float>(), batch, abs_max.data_ptr<double>(), M, d);
  return at::tensor(margins, query.options().dtype(at::kDouble)).view({batch, 2});
}

std::tuple<at::Tensor, at::Tensor> pq_topk_decoded(const at::Tensor& query, const at::Tensor& centroids_t,
                                                   const c10::optional<at::Tensor>& S_given, const at::Tensor& table,
                                                   const at::Tensor& abs_max, const at::Tensor& blocked, int64_t n,
                                                   int64_t k, const c10::optional<at::Tensor>& exclude,
                                                   c10::string_view simd) {
  check_blocked(blocked, n);
  const int64_t M = blocked.size(1);
  TORCH_CHECK(centroids_t.device().is_cpu() && centroids_t.scalar_type() == at::kFloat && centroids_t.dim() == 3 &&
                  centroids_t.size(0) == M && centroids_t.is_contiguous(),
              "recjpq_cpu: centroids_t must be a contiguous float32 CPU tensor [M, d / M, K] with the codes' M");
  const int64_t dsub = centroids_t.size(1), K = centroids_t.size(2), d = M * dsub;
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == at::kFloat && query.dim() == 2 &&
                  query.size(1) == d && query.is_contiguous(),
              "recjpq_cpu: query must be a contiguous float32 CPU tensor [B, d] with d = M x d/M of the centroids");
  const int64_t batch = query.size(0);
  if (S_given) {
    check_table(*S_given, M);
    TORCH_CHECK(S_given->size(0) == batch && S_given->size(2) == K, "recjpq_cpu: S must be [B, M, K]");
    check_finite(*S_given);
  } else {
    TORCH_CHECK(dsub <= kSmallSplit, "recjpq_cpu: S is computed here only for d/M <= ", kSmallSplit);
  }
  TORCH_CHECK(k >= 1 && k <= n, "recjpq_cpu: k must be in [1, N=", n, "], got ", k);
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(0) == d &&
                  table.size(1) == n && table.is_contiguous(),
              "recjpq_cpu: the decoded table must be contiguous float32 [d, N]");
  check_abs_max(abs_max, d);
  const ExcludeLists excluded(exclude, batch, n);
  const std::vector<double> margins = margins_of(query.data_ptr<float>(), batch, abs_max.data_ptr<double>(), M, d);
  const Simd level = parse_simd(std::string(simd));
  const AboveFn above = above_fn(level);
  const GemvFn gemv = gemv_fn(level);
  // Queries go in chunks whose GEMM rows (and S rows, when computed here) stay in cache for the
  // selection: at B = 512, N = 3,417, M = 32 a whole-batch S and GEMM (23 MB) made the rescoring's
  // reads of S miss the cache and cost 4x the GEMM. At least 32 rows: a GEMM of 8 rows costs 1.4x
  // as much per row as one of 32 (d = 64, one AVX-512 thread).
  const int64_t row_bytes = 4 * (n + (S_given ? 0 : M * K));
  const int64_t chunk = std::min<int64_t>(batch, std::max<int64_t>(32, (1 << 20) / row_bytes));
  at::Tensor values = at::empty({batch, k}, query.options());
  at::Tensor indices = at::empty({batch, k}, query.options().dtype(at::kLong));
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t rows = std::min(chunk, batch - b0);
    const at::Tensor q_rows = query.narrow(0, b0, rows);
    at::Tensor S;
    if (S_given) {
      S = S_given->narrow(0, b0, rows);
    } else {
      S = workspace(1, {rows, M, K});
      subitem_scores_transposed_fn(level)(q_rows.data_ptr<float>(), rows, centroids_t.data_ptr<float>(), M, K, dsub,
                                          S.data_ptr<float>());
      bool bounded = true;  // then S is finite (margins_of), and the check would only cost time
      for (int64_t r = 0; r < rows; ++r) bounded &= margins[2 * (b0 + r) + 1] < kSafeBound;
      if (!bounded) check_finite(S);
    }
    at::Tensor approx = workspace(2, {rows, n});
    if (gemv && rows <= kGemvRows) {
      for (int64_t r = 0; r < rows; ++r)
        gemv(q_rows.data_ptr<float>() + r * d, d, table.data_ptr<float>(), n, approx.data_ptr<float>() + r * n);
    } else {
      at::mm_out(approx, q_rows, table);
    }
    dispatch_codes(blocked.scalar_type(), [&](auto tag) {
      using CodeT = decltype(tag);
      select_chunk<CodeT>(approx.data_ptr<float>(), S.data_ptr<float>(), blocked.data_ptr<CodeT>(), n, M, K, k, b0, rows,
                          margins.data(), excluded, above, values.data_ptr<float>(),
                          indices.data_ptr<int64_t>());
    });
  }
  return {values, indices};
}

TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m) {
  m.def("decoded_margin(Tensor query, Tensor abs_max, int M) -> Tensor", &decoded_margin);
  m.def("pq_topk_decoded(Tensor query, Tensor centroids_t, Tensor? S, Tensor table, Tensor abs_max, Tensor blocked, "
        "int n, int k, Tensor? exclude, str simd) -> (Tensor, Tensor)",
        &pq_topk_decoded);
}

}  // namespace recjpq_cpu
