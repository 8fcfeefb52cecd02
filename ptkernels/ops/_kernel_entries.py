"""The compiled library's kernel entry points, derived from the public ops.

One namespace, one schema per op. The public ops (``ptkernels::prefix_attention_fwd``, ...) are
defined here in Python, because a pure-Python install has no C++ library, and they carry a
``backend`` argument that Python resolves (eager, triton or cuda). The C++ library (``csrc/``)
defines no schema and no Meta function of its own: it registers CUDA kernels, with
``TORCH_LIBRARY_IMPL(ptkernels, CUDA, m)``, under ``ptkernels::<op>_cuda``. That entry's schema is
written here from the public op's schema, without the ``backend`` argument. Its fake is the public
op's fake. If an argument is added to a public op, the kernel entry gets it too, and the C++
registration then fails at import with a schema mismatch instead of drifting silently.

The dispatcher accepts a kernel registered before its schema is defined. ``import ptkernels._C``
may therefore run before or after this module.
"""
from __future__ import annotations

import torch

KERNEL_SUFFIX = "_cuda"
_BACKEND_ARG = ", str backend"

_lib = torch.library.Library("ptkernels", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)


def kernel_schema(public_op) -> str:
    """The kernel entry's schema: the public op's without ``backend``, under ``<name>_cuda``.

    ``public_op``: a ``torch.library.custom_op`` whose last argument is ``str backend``.
    """
    schema = str(public_op._opoverload._schema)
    namespace, rest = schema.split("::", 1)
    name, signature = rest.split("(", 1)
    args, sep, returns = signature.partition(") -> ")
    if namespace != "ptkernels" or not args.endswith(_BACKEND_ARG):
        raise AssertionError(f"a public op must live in ptkernels:: and end with 'str backend': "
                             f"{schema}")
    return f"{name}{KERNEL_SUFFIX}({args[:-len(_BACKEND_ARG)]}{sep}{returns}"


def define_kernel_entry(public_op, fake) -> str:
    """Define ``ptkernels::<op>_cuda`` from ``public_op`` and give it ``fake`` (with backend="cuda").

    Returns the qualified name of the kernel entry.
    """
    schema = kernel_schema(public_op)
    _lib.define(schema)
    name = "ptkernels::" + schema.split("(", 1)[0]
    torch.library.register_fake(name, lambda *args: fake(*args, "cuda"), lib=_lib)
    return name
