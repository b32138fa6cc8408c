// recjpq.ops.pq_topk_query's call for a few float32 CPU queries outside autograd (a model's top-k
// at inference; recjpq.backends.cpu.topk_query_small): the sub-item score table and the scan in one
// call from Python, saving two dispatches and the Python between them; with a decoded item table,
// the "matmul" algorithm (pq_topk_decoded.cpp) instead of the scan. Returns None where a
// precondition does not hold; Python then takes its general path, which raises the error or handles
// the case, so the messages live in one place. The table is computed as recjpq.ops.subitem_scores
// computes it for the same queries, so the result is the general path's, bit for bit.
#include "pq_topk_query.h"

#include <c10/util/accumulate.h>

#include "pq_common.h"

namespace recjpq_cpu {

// A helper revoked by pq_topk may still read the table after the call returns (docs/cpu-kernel.md);
// it holds the tensor, so the memory stays valid, and it only scores into its dropped slot, so a
// later call's values cannot reach any result.
at::Tensor workspace(int slot, at::IntArrayRef sizes) {
  thread_local at::Tensor buffers[3];
  const int64_t numel = c10::multiply_integers(sizes);
  at::Tensor& buffer = buffers[slot];
  if (!buffer.defined() || buffer.numel() < numel) buffer = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  return buffer.narrow(0, 0, numel).view(sizes);
}

namespace {

// recjpq.ops.subitem_scores's table for these queries, bit for bit: the C++ kernel for up to
// `kernel_rows` queries or up to kSmallSplit dimensions per split, else the batched matmul on the
// same views Python passes to torch.bmm.
at::Tensor scores_table(const at::Tensor& query, const at::Tensor& centroids, int64_t kernel_rows, Simd simd) {
  const int64_t batch = query.size(0), M = centroids.size(0), K = centroids.size(1), dsub = centroids.size(2);
  at::Tensor S = workspace(1, {batch, M, K});
  if (batch <= kernel_rows || dsub <= kSmallSplit) {
    subitem_scores_into(simd, query.data_ptr<float>(), batch, centroids.data_ptr<float>(), M, K, dsub,
                        S.data_ptr<float>());
    return S;
  }
  at::Tensor by_split = workspace(0, {M, batch, K});
  at::bmm_out(by_split, query.view({batch, M, dsub}).transpose(0, 1), centroids.transpose(1, 2));
  return S.copy_(by_split.transpose(0, 1));
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor>> pq_topk_query_small(const at::Tensor& query,
                                                                      const at::Tensor& centroids,
                                                                      const at::Tensor& blocked, int64_t n,
                                                                      int64_t k,
                                                                      const std::optional<at::Tensor>& exclude,
                                                                      const std::string& simd, int64_t kernel_rows,
                                                                      const std::optional<at::Tensor>& table,
                                                                      const std::optional<at::Tensor>& abs_max,
                                                                      const std::optional<at::Tensor>& centroids_t) {
  auto dense_float = [](const at::Tensor& t, int64_t dims) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dims && t.is_contiguous();
  };
  if (!dense_float(query, 2) || !dense_float(centroids, 3)) return std::nullopt;
  const int64_t batch = query.size(0), M = centroids.size(0), K = centroids.size(1), dsub = centroids.size(2);
  if (batch < 1 || M < 1 || K < 1 || dsub < 1 || query.size(1) != M * dsub) return std::nullopt;
  if (!blocked.device().is_cpu() || blocked.dim() != 3 || blocked.size(1) != M || k < 1 || k > n) return std::nullopt;
  if (exclude && !(exclude->device().is_cpu() && exclude->scalar_type() == at::kLong && exclude->dim() == 2 &&
                   exclude->size(0) == batch && exclude->is_contiguous()))
    return std::nullopt;
  if (table.has_value() != abs_max.has_value() || table.has_value() != centroids_t.has_value() ||
      (table && !(dense_float(*table, 2) && table->size(0) == query.size(1) && table->size(1) == n &&
                  dense_float(*centroids_t, 3) && centroids_t->sizes() == at::IntArrayRef({M, dsub, K}))))
    return std::nullopt;
  if (table && dsub <= kSmallSplit)  // S in chunks, inside
    return pq_topk_decoded(query, *centroids_t, std::nullopt, *table, *abs_max, blocked, n, k, exclude, simd);
  const at::Tensor S = scores_table(query, centroids, kernel_rows, parse_simd(simd));
  if (table) return pq_topk_decoded(query, *centroids_t, S, *table, *abs_max, blocked, n, k, exclude, simd);
  return pq_topk(S, blocked, n, k, exclude, simd);
}

}  // namespace recjpq_cpu
