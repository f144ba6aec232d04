// The Python module mmsd_ext._C. It holds no ops of its own: loading it runs the
// TORCH_LIBRARY registrations of every op file linked into it. What it exports is
// how it was built, so that mmsd_ext.build_info() reports the truth of the binary.
#include <Python.h>
#include <torch/extension.h>

#ifdef MMSD_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

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
}
