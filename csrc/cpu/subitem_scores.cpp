// The sub-item score table S[b, m, k] = query[b, m-th chunk] . centroids[m, k] for inference on CPU.
//
// torch's einsum hands this small product (B = 1, d = 512, K = 256: 131k multiply-adds) to a BLAS
// parallel region, whose barrier waits for every OpenMP thread: on a busy machine one that is not
// scheduled holds a 0.2 ms top-k call for a time slice. Here the table is computed on the calling
// thread alone, with one fixed order of arithmetic at every SIMD level and batch size
// (subitem_scores_fn in pq_simd.cpp). With d/M <= 8 it is several times faster than the batched
// matmul at any batch, so it serves every batch there, large ones shared out by caller-runs work
// sharing (each entry has its one order, so the split does not change a bit).
#include "pq_common.h"

#include "work_sharing.h"

namespace recjpq_cpu {

void subitem_scores_into(Simd level, const float* query, int64_t batch, const float* centroids, int64_t M, int64_t K,
                         int64_t dsub, float* S) {
  constexpr int64_t kRows = 64;  // queries per unit of work
  const SubitemScoresFn fn = subitem_scores_fn(level);
  auto unit = [&](int64_t u, int) {
    const int64_t b0 = u * kRows, rows = std::min(kRows, batch - b0);
    fn(query + b0 * M * dsub, rows, centroids, M, K, dsub, S + b0 * M * K);
  };
  run_units((batch + kRows - 1) / kRows, 0, unit);
}

namespace {

at::Tensor subitem_scores(const at::Tensor& query, const at::Tensor& centroids, c10::string_view simd) {
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == at::kFloat && query.dim() == 2 && query.is_contiguous(),
              "recjpq_cpu: query must be a contiguous float32 CPU tensor [B, d]");
  TORCH_CHECK(centroids.device().is_cpu() && centroids.scalar_type() == at::kFloat && centroids.dim() == 3 &&
                  centroids.is_contiguous(),
              "recjpq_cpu: centroids must be a contiguous float32 CPU tensor [M, K, d / M]");
  const int64_t batch = query.size(0), M = centroids.size(0), K = centroids.size(1), dsub = centroids.size(2);
  TORCH_CHECK(query.size(1) == M * dsub, "recjpq_cpu: query has d=", query.size(1), " but centroids need M x d/M = ",
              M * dsub);
  at::Tensor S = at::empty({batch, M, K}, query.options());
  subitem_scores_into(parse_simd(std::string(simd)), query.data_ptr<float>(), batch, centroids.data_ptr<float>(), M,
                      K, dsub, S.data_ptr<float>());
  return S;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m) {
  m.def("subitem_scores(Tensor query, Tensor centroids, str simd) -> Tensor", &subitem_scores);
}

}  // namespace recjpq_cpu
