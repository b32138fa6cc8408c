// The sub-item score table S[b, m, k] = query[b, m-th chunk] . centroids[m, k] for inference on CPU.
//
// torch's einsum hands this small product (B = 1, d = 512, K = 256: 131k multiply-adds) to a BLAS
// parallel region, whose barrier waits for every OpenMP thread: on a busy machine one that is not
// scheduled holds a 0.2 ms top-k call for a time slice. Here the table is computed on the calling
// thread alone; recjpq.ops.subitem_scores sends only small tables here (BLAS wins from 4 queries).
#include "pq_common.h"

namespace recjpq_cpu {
namespace {

at::Tensor subitem_scores(const at::Tensor& query, const at::Tensor& centroids) {
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == at::kFloat && query.dim() == 2 && query.is_contiguous(),
              "recjpq_cpu: query must be a contiguous float32 CPU tensor [B, d]");
  TORCH_CHECK(centroids.device().is_cpu() && centroids.scalar_type() == at::kFloat && centroids.dim() == 3 &&
                  centroids.is_contiguous(),
              "recjpq_cpu: centroids must be a contiguous float32 CPU tensor [M, K, d / M]");
  const int64_t batch = query.size(0), M = centroids.size(0), K = centroids.size(1), dsub = centroids.size(2);
  TORCH_CHECK(query.size(1) == M * dsub, "recjpq_cpu: query has d=", query.size(1), " but centroids need M x d/M = ",
              M * dsub);
  at::Tensor S = at::empty({batch, M, K}, query.options());
  const float* q = query.data_ptr<float>();
  const float* c = centroids.data_ptr<float>();
  float* out = S.data_ptr<float>();
  for (int64_t unit = 0; unit < batch * M; ++unit) {  // one (query, split): K dot products of length dsub
    const int64_t b = unit / M, m = unit % M;
    const float* qm = q + b * M * dsub + m * dsub;
    for (int64_t k = 0; k < K; ++k) {
      const float* ck = c + (m * K + k) * dsub;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < dsub; ++j) acc += qm[j] * ck[j];
      out[(b * M + m) * K + k] = acc;
    }
  }
  return S;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m) {
  m.def("subitem_scores(Tensor query, Tensor centroids) -> Tensor", &subitem_scores);
}

}  // namespace recjpq_cpu
