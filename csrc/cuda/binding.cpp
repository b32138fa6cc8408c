// Binds the C-style launchers of pq_kernels.h to torch.library as torch.ops.recjpq_cuda.* for CUDA
// tensors. Inputs arrive validated and planned by recjpq/backends/cuda.py; the checks here only
// guard the pointers handed to the kernels.
#include <Python.h>  // first, as CPython asks

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "pq_kernels.h"

namespace {

void check_inputs(const at::Tensor& S, const at::Tensor& codes) {
  TORCH_CHECK(S.is_cuda() && codes.is_cuda() && S.device() == codes.device(),
              "recjpq_cuda: S and codes must be on one CUDA device");
  TORCH_CHECK(S.scalar_type() == at::kFloat && S.dim() == 3 && S.is_contiguous(),
              "recjpq_cuda: S must be a contiguous float32 [B, M, K] tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.size(1) == S.size(1),
              "recjpq_cuda: codes must be a contiguous [N, M] tensor matching S");
  const auto dtype = codes.scalar_type();
  TORCH_CHECK(dtype == at::kByte || dtype == at::kShort || dtype == at::kInt,
              "recjpq_cuda: codes must be uint8, int16 or int32");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "recjpq_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor pq_scores(const at::Tensor& S, const at::Tensor& codes, int64_t query_group, int64_t grid_x) {
  check_inputs(S, codes);
  const c10::cuda::CUDAGuard guard(S.device());
  auto out = at::empty({S.size(0), codes.size(0)}, S.options());
  check_launch(recjpq_pq_scores(S.data_ptr<float>(), codes.data_ptr(), static_cast<int>(codes.element_size()),
                                S.size(0), static_cast<int>(S.size(1)), static_cast<int>(S.size(2)),
                                codes.size(0), out.data_ptr<float>(), static_cast<int>(query_group),
                                static_cast<int>(grid_x), c10::cuda::getCurrentCUDAStream()),
               "pq_scores");
  return out;
}

at::Tensor pq_topk_candidates(const at::Tensor& S, const at::Tensor& codes, const std::optional<at::Tensor>& exclude,
                              int64_t k, int64_t buffer_len, int64_t query_group, int64_t grid_x) {
  check_inputs(S, codes);
  const int64_t batch = S.size(0);
  const int64_t* exclude_ptr = nullptr;
  int64_t excluded = 0;
  if (exclude.has_value()) {
    const at::Tensor& ex = *exclude;
    TORCH_CHECK(ex.device() == S.device() && ex.scalar_type() == at::kLong && ex.dim() == 2 &&
                    ex.size(0) == batch && ex.is_contiguous(),
                "recjpq_cuda: exclude must be a contiguous int64 [B, E] tensor on S's device");
    exclude_ptr = ex.data_ptr<int64_t>();
    excluded = ex.size(1);
  }
  const c10::cuda::CUDAGuard guard(S.device());
  auto long_options = S.options().dtype(at::kLong);
  auto thresholds = at::full({batch}, std::numeric_limits<int64_t>::min(), long_options);
  auto candidates = at::empty({batch, grid_x, k}, long_options);
  check_launch(recjpq_pq_topk_candidates(
                   S.data_ptr<float>(), codes.data_ptr(), static_cast<int>(codes.element_size()), exclude_ptr,
                   excluded, batch, static_cast<int>(S.size(1)), static_cast<int>(S.size(2)), codes.size(0),
                   static_cast<int>(k), static_cast<int>(buffer_len), static_cast<int>(query_group),
                   static_cast<int>(grid_x), thresholds.data_ptr<int64_t>(), candidates.data_ptr<int64_t>(),
                   c10::cuda::getCurrentCUDAStream()),
               "pq_topk_candidates");
  return candidates;
}

}  // namespace

TORCH_LIBRARY(recjpq_cuda, m) {
  m.def("pq_scores(Tensor S, Tensor codes, int query_group, int grid_x) -> Tensor");
  m.def("pq_topk_candidates(Tensor S, Tensor codes, Tensor? exclude, int k, int buffer_len, int query_group, "
        "int grid_x) -> Tensor");
}

TORCH_LIBRARY_IMPL(recjpq_cuda, CUDA, m) {
  m.impl("pq_scores", &pq_scores);
  m.impl("pq_topk_candidates", &pq_topk_candidates);
}

// The Python module entry: importing it runs the registrations above. Plain CPython (no pybind11)
// keeps the torch headers this file parses to the few it needs.
#define RECJPQ_PYINIT_NAME(name) PyInit_##name
#define RECJPQ_PYINIT(name) RECJPQ_PYINIT_NAME(name)
#define RECJPQ_STR_NAME(name) #name
#define RECJPQ_STR(name) RECJPQ_STR_NAME(name)

PyMODINIT_FUNC RECJPQ_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, RECJPQ_STR(TORCH_EXTENSION_NAME),
                               "recjpq CUDA kernels (registered as torch.ops.recjpq_cuda.*)", -1, nullptr};
  return PyModule_Create(&module);
}
