// The Python module entry of recjpq._C. Ops are registered with TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m)
// in each kernel's own file and called as torch.ops.recjpq_cpu.*; importing the module loads them.
// pq_topk_query_small is a plain function: the dispatcher would cost as much as the scan it saves.
#include <torch/extension.h>

#include "pq_topk_query.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recjpq CPU kernels (registered as torch.ops.recjpq_cpu.*)";
  m.def("pq_topk_query_small", &recjpq_cpu::pq_topk_query_small, "(values, indices), or None where it does not apply",
        pybind11::arg("query"), pybind11::arg("centroids"), pybind11::arg("blocked"), pybind11::arg("n"),
        pybind11::arg("k"), pybind11::arg("exclude"), pybind11::arg("simd"), pybind11::arg("kernel_rows"),
        pybind11::arg("table") = pybind11::none(), pybind11::arg("abs_max") = pybind11::none(),
        pybind11::arg("centroids_t") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());  // as torch.ops calls do: a server's other threads run
}
