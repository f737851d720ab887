// Entry point of the compiled extension jit_kernels._C.
//
// The operator schemas are defined once, in Python (jit_kernels/_library.py),
// because the package must also work when this extension is missing. This
// library only adds kernels: csrc/cpu/*.cpp register TORCH_LIBRARY_IMPL(jit_kernels, CPU, m)
// and csrc/cuda/*.cu register TORCH_LIBRARY_IMPL(jit_kernels, CUDA, m).
// Importing the module runs those static registrations.

#include <Python.h>

extern "C" {
// A Python module with no methods: `import jit_kernels._C` loads the shared
// library (and with it the kernel registrations) under the limited API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
