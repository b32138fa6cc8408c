// recjpq.ops.pq_topk_query's call for one or two float32 CPU queries outside autograd (a model's
// top-k at inference; recjpq.backends.cpu.topk_query_small): the sub-item score table and the scan
// in one call from Python, saving two dispatches and the Python between them. Returns None where a
// precondition does not hold; Python then takes its general path, which raises the error or handles
// the case, so the messages live in one place. The table is the C++ one that recjpq.ops.subitem_scores
// computes for the same one or two queries, so the result is the general path's, bit for bit.
#include "pq_topk_query.h"

#include "pq_common.h"

namespace recjpq_cpu {

std::optional<std::tuple<at::Tensor, at::Tensor>> pq_topk_query_small(const at::Tensor& query,
                                                                      const at::Tensor& centroids,
                                                                      const at::Tensor& blocked, int64_t n,
                                                                      int64_t k,
                                                                      const std::optional<at::Tensor>& exclude,
                                                                      const std::string& simd) {
  auto dense_float = [](const at::Tensor& t, int64_t dims) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dims && t.is_contiguous();
  };
  if (!dense_float(query, 2) || !dense_float(centroids, 3)) return std::nullopt;
  const int64_t batch = query.size(0), M = centroids.size(0), K = centroids.size(1), dsub = centroids.size(2);
  if (batch < 1 || M < 1 || K < 1 || dsub < 1 || query.size(1) != M * dsub)
    return std::nullopt;
  if (!blocked.device().is_cpu() || blocked.dim() != 3 || blocked.size(1) != M || k < 1 || k > n) return std::nullopt;
  if (exclude && !(exclude->device().is_cpu() && exclude->scalar_type() == at::kLong && exclude->dim() == 2 &&
                   exclude->size(0) == batch && exclude->is_contiguous()))
    return std::nullopt;
  at::Tensor S = at::empty({batch, M, K}, query.options());
  subitem_scores_fn(parse_simd(simd))(query.data_ptr<float>(), batch, centroids.data_ptr<float>(), M, K, dsub,
                                      S.data_ptr<float>());
  return pq_topk(S, blocked, n, k, exclude, simd);
}

}  // namespace recjpq_cpu
