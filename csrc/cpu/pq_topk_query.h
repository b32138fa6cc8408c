// The one-call top-k for a model's inference queries (pq_topk_query.cpp), bound in module.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace recjpq_cpu {

// With `table` (the decoded items [d, N], from the same codes snapshot as `blocked`), `abs_max`
// (per-dimension max |centroid|, float64 [d]) and `centroids_t` (the centroids as [M, d/M, K]):
// recjpq.ops._decoded.DecodedTable's, the "matmul" algorithm.
std::optional<std::tuple<at::Tensor, at::Tensor>> pq_topk_query_small(const at::Tensor& query,
                                                                      const at::Tensor& centroids,
                                                                      const at::Tensor& blocked, int64_t n,
                                                                      int64_t k,
                                                                      const std::optional<at::Tensor>& exclude,
                                                                      const std::string& simd, int64_t kernel_rows,
                                                                      const std::optional<at::Tensor>& table,
                                                                      const std::optional<at::Tensor>& abs_max,
                                                                      const std::optional<at::Tensor>& centroids_t);

}  // namespace recjpq_cpu
