// The Python module cat_kernels._C: importing it loads this library, whose static initializers
// register the cat_kernels ops (TORCH_LIBRARY); the ops are called through torch.ops.cat_kernels.
#include <Python.h>

#ifdef CAT_KERNELS_CPU_ONLY
static const int kWithCuda = 0;
#else
static const int kWithCuda = 1;
#endif

static struct PyModuleDef cat_kernels_module = {PyModuleDef_HEAD_INIT, "_C",
                                                "cat_kernels compiled ops (see torch.ops.cat_kernels)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&cat_kernels_module);
  if (m != nullptr && PyModule_AddIntConstant(m, "WITH_CUDA", kWithCuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
