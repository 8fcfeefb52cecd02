"""CUDA backend: the kernels of ``ptkernels._C`` (csrc/), called as ``torch.ops.ptkernels.*_cuda``.

``ptkernels._C``, when built with nvcc and a CUDA build of torch, registers CUDA kernels (csrc/*.cu
over the torch-free kernels in csrc/kernels/) for the kernel entries ``ptkernels::<op>_cuda``. Their
schemas are defined in Python, derived from the public ops (``ptkernels/ops/_kernel_entries.py``);
the library itself defines no schema. An op is available when its CUDA kernels are registered
and the device is a CUDA GPU of compute capability 8.0 or newer.

Dropout: the CUDA attention kernels do not implement it (their random stream would have to match
the Triton backend's bit for bit) and ``torch.ops.ptkernels.prefix_attention_*_cuda`` reject
``dropout_p > 0``. This module routes such calls, forward and backward alike, to the next backend
that can run them (triton when it is available on the device, else eager), so a dropout call
never fails here and its forward and backward always use the same mask.
"""
from __future__ import annotations

import torch

from ptkernels import backends

NAME = "cuda"

# What `ptkernels info` says about the one feature the CUDA kernels hand to another backend.
DROPOUT_ROUTE = ("attention dropout (dropout_p > 0) on the cuda backend runs on triton (eager "
                 "without triton), forward and backward: the CUDA kernels have no Philox stream "
                 "bit-equal to Triton's")

_OPS = {
    "prefix_attention": ("prefix_attention_fwd", "prefix_attention_bwd"),
    "gpc_cell": ("gpc_cell_fwd", "gpc_cell_bwd"),
}

_ext_error: str | None = None
try:
    import ptkernels._C  # noqa: F401  (registers CUDA kernels for torch.ops.ptkernels.*_cuda)
except ImportError as exc:  # not built (pure-Python install) or built for another torch
    _ext_error = repr(exc)


def has_cuda_kernels(op: str) -> bool:
    """Whether ``ptkernels._C`` registered CUDA implementations for both passes of ``op``."""
    if _ext_error is not None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ptkernels::{name}_cuda", "CUDA")
               for name in _OPS[op])


def is_available(op: str, device: torch.device) -> tuple[bool, str]:
    if _ext_error is not None:
        return False, f"the extension ptkernels._C cannot be imported: {_ext_error}"
    if op not in _OPS:
        return False, f"unknown op {op!r}"
    if not has_cuda_kernels(op):
        return False, (f"ptkernels._C has no CUDA kernels for {op} (built without nvcc / a CUDA "
                       "build of torch, PTKERNELS_BUILD_CUDA=0, or built before csrc/*.cu existed: "
                       "rebuild with `make install`)")
    if device.type != "cuda":
        return False, "the CUDA kernels run on CUDA tensors only"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"needs compute capability >= 8.0 (sm_80), device has sm_{major}{minor}"
    return True, "CUDA kernels from ptkernels._C"


def _dropout_backend(device: torch.device):
    """The backend that runs attention dropout in place of this one."""
    ok, _ = backends.availability("triton", "prefix_attention", device)
    return backends.get("triton" if ok else "eager")


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                         dropout_seed, causal, window, softcap, scale, dropout_p):
    if dropout_p > 0:
        return _dropout_backend(q.device).prefix_attention_fwd(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, dropout_seed,
            causal, window, softcap, scale, dropout_p)
    out, lse = torch.ops.ptkernels.prefix_attention_fwd_cuda(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, dropout_seed,
        causal, window, softcap, scale, dropout_p)
    return out, lse


def prefix_attention_bwd(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index,
                         key_padding_mask, attn_bias, dropout_seed, out, lse, causal, window,
                         softcap, scale, dropout_p, output_mask):
    if dropout_p > 0:
        return _dropout_backend(q.device).prefix_attention_bwd(
            grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
            attn_bias, dropout_seed, out, lse, causal, window, softcap, scale, dropout_p,
            output_mask)
    return tuple(torch.ops.ptkernels.prefix_attention_bwd_cuda(
        grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        attn_bias, dropout_seed, out, lse, causal, window, softcap, scale, dropout_p,
        [bool(x) for x in output_mask]))


def gpc_cell_fwd(update, state, weight, bias, variant):
    new_state, preact = torch.ops.ptkernels.gpc_cell_fwd_cuda(update, state, weight, bias, variant)
    return new_state, preact


def gpc_cell_bwd(grad_new_state, update, state, weight, bias, preact, variant, output_mask):
    return tuple(torch.ops.ptkernels.gpc_cell_bwd_cuda(grad_new_state, update, state, weight, bias, preact,
                                            variant, [bool(x) for x in output_mask]))
