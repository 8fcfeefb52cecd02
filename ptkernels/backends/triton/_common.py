"""Helpers shared by every Triton kernel module of ptkernels.

* ``INTERPRET``: True when ``TRITON_INTERPRET=1`` was set before import (kernels run on CPU tensors
  through the Triton interpreter). Kernels take it as a ``tl.constexpr`` so that the interpreter
  path upcasts bf16 right after ``tl.load`` and multiplies in fp32 (the interpreter stores bf16 as
  raw uint16 bits: ``tl.dot`` and elementwise math on bf16 give garbage there), while the GPU path
  keeps 16-bit operands for the tensor cores.
* ``mma``: the one ``tl.dot`` wrapper every kernel uses (fp32 accumulation; fp32 operands use
  ``tf32x3`` on the GPU, which keeps fp32-level accuracy on tensor cores; ``ieee`` in the
  interpreter).
* dtype and block-size helpers, and ``alloc`` (outputs poisoned with NaN when
  ``PTKERNELS_DEBUG_POISON=1``, so a kernel that forgets to write an element fails the tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Type strings of ``triton.compile`` signatures (AOT specs).
SIG_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def poison_enabled() -> bool:
    return os.environ.get("PTKERNELS_DEBUG_POISON", "0") == "1"


def alloc(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled under ``PTKERNELS_DEBUG_POISON=1``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan"))
    return out


def block_d(d: int) -> int:
    """Head-dim tile: the next power of two >= max(d, 16) (``tl.dot`` needs >= 16); loads mask d."""
    return max(16, triton.next_power_of_2(d))


def strides(x: torch.Tensor | None, n: int) -> tuple[int, ...]:
    """The strides of ``x`` (elements), or ``n`` zeros when ``x`` is None (unused pointer)."""
    return tuple(x.stride()) if x is not None else (0,) * n


def is_interpreting(device: torch.device) -> bool:
    return INTERPRET and torch.device(device).type == "cpu"


@triton.jit
def mma(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    Under the interpreter both operands are upcast to fp32 (bf16 dots multiply raw bits there);
    on the GPU fp16/bf16 operands go to the tensor cores as they are, and fp32 operands use
    ``tf32x3`` (3 TF32 products: fp32-level error on tensor cores, unlike plain tf32).
    """
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def aot_signature(kernel, pointer_types: dict, float_args=(), constexprs=None, div16=()):
    """Signature dict for an AOT spec (``tests/triton_aot.py``): pointers as given, the names in
    ``float_args`` as fp32, every other non-constexpr parameter as i32."""
    constexprs = constexprs or {}
    sig = {}
    for a in kernel.arg_names:
        if a in constexprs:
            continue
        sig[a] = pointer_types.get(a) or ("fp32" if a in float_args else "i32")
    return sig
