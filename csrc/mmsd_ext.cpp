// The Python module mmsd_ext._C. It holds no ops of its own: loading it runs the
// TORCH_LIBRARY registrations of every op file linked into it. What it exports is
// how it was built and which CPU kernels it picked, so that mmsd_ext.build_info()
// reports the truth of the binary.
#include <Python.h>
#include <torch/extension.h>

#ifdef MMSD_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace mmsd_ext {
namespace distill {
// The vector ISA the CPU distillation kernels run with (csrc/cpu/distill_kernel.cpp).
const char* cpu_isa();
}  // namespace distill
}  // namespace mmsd_ext

PYBIND11_MODULE(_C, m) {
  m.attr("version") = MMSD_EXT_VERSION;
#ifdef MMSD_EXT_WITH_CUDA
  m.attr("with_cuda") = true;
  // CUDART_VERSION is e.g. 13000 for CUDA 13.0.
  m.attr("cuda_version") = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_version") = pybind11::none();
#endif
  // A function, not an attribute: a bad MMSD_EXT_DISTILL_CPU_ISA is an error when
  // asked, and must not stop the module from loading.
  m.def("distill_cpu_isa", [] { return std::string(mmsd_ext::distill::cpu_isa()); });
}
