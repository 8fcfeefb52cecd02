"""Triton backend: fused prefix attention (forward, backward, prompt-only backward, decode) and
the GPC cell. On CPU tensors the same kernels run under ``TRITON_INTERPRET=1`` (set before the
kernels are imported), which is how CI tests them.

Each op is available when its kernel modules import and the device can run them.
"""
from __future__ import annotations

import os

import torch

NAME = "triton"

_import_errors: dict[str, str] = {}

try:
    import triton  # noqa: F401
except ImportError as exc:  # e.g. not Linux
    _import_errors["triton"] = repr(exc)

if "triton" not in _import_errors:
    try:
        from ptkernels.backends.triton.attention_fwd import prefix_attention_fwd  # noqa: F401
        from ptkernels.backends.triton.attention_bwd import prefix_attention_bwd  # noqa: F401
    except ImportError as exc:
        _import_errors["prefix_attention"] = repr(exc)
    try:
        from ptkernels.backends.triton.gpc import gpc_cell_bwd, gpc_cell_fwd  # noqa: F401
    except ImportError as exc:
        _import_errors["gpc_cell"] = repr(exc)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available(op: str, device: torch.device) -> tuple[bool, str]:
    if "triton" in _import_errors:
        return False, f"triton is not importable: {_import_errors['triton']}"
    if op in _import_errors:
        return False, f"kernels for {op} failed to import: {_import_errors[op]}"
    if device.type == "cuda":
        if interpreting():
            return False, "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"needs compute capability >= 8.0 (sm_80), device has sm_{major}x"
        return True, "compiled Triton kernels"
    if device.type == "cpu":
        if interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
        return False, "CPU tensors need TRITON_INTERPRET=1 (the interpreter) set before import"
    return False, f"unsupported device type {device.type!r}"
