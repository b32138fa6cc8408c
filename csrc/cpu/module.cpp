// The Python module entry of recjpq._C. Ops are registered with TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m)
// in each kernel's own file and called as torch.ops.recjpq_cpu.*; importing the module loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recjpq CPU kernels (registered as torch.ops.recjpq_cpu.*)";
}
