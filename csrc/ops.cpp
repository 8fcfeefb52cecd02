// ptkernels._C: a bare Python module whose only job is to load this library, so that the static
// TORCH_LIBRARY_IMPL(ptkernels, CUDA, m) registrars in csrc/*.cu run.
//
// One op namespace, one schema per op: the schemas live in Python. The public ops
// (ptkernels::prefix_attention_fwd, ...) carry a `backend` argument resolved in Python. The CUDA
// kernels implement the kernel entries ptkernels::<op>_cuda, whose schemas are derived from the
// public ops in ptkernels/ops/_kernel_entries.py: the same arguments without `backend`. The library
// defines no schema and no Meta function; fakes come from Python, so torch.compile and meta tensors
// use the public ops' fakes. The dispatcher accepts kernels registered before their schema is
// defined. When Python defines the schema, it checks every registered kernel's C++ signature
// against it, so a drift between the two fails at import.
//
// This file stays free of CUDA and of <torch/extension.h> (pybind11), so it compiles in seconds
// with a CPU or a CUDA build of torch.

#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                                      /* m_name */
      "ptkernels native library: CUDA kernels for torch.ops.ptkernels.*_cuda",  /* m_doc */
      -1,                                                                        /* m_size */
      nullptr,                                                                   /* m_methods */
  };
  return PyModule_Create(&module_def);
}
