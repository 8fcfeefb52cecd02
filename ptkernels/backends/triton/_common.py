"""Helpers shared by every Triton kernel module of ptkernels (the one home of device helpers).

Naming scheme of every attention kernel (forward, decode, backward): pointers ``<t>_ptr``, element
strides ``s_<t><dim>`` (``t`` in q, k, v, pk, pv (prefix), kpm (key padding mask), b (bias), o / do
/ dq / dk / dv / g (gradient outputs); ``dim`` in b, h, t (prefix bank), m (query row), n (key),
d), feature flags ``CAUSAL, HAS_WINDOW, HAS_KPM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT``,
``PREFIX_MODE`` (below) and ``FP32_DOTS``; the head dim ``D`` is a ``tl.constexpr`` (the code is
specialized per head dim, so a power-of-two head dim compiles without column masks: vector loads,
``cp.async``).

* ``INTERPRET``: True when ``TRITON_INTERPRET=1`` was set before import (kernels run on CPU tensors
  through the Triton interpreter).
* ``FP32_DOTS`` (a constexpr of every attention kernel): upcast tiles right after the load and
  multiply in exact fp32 (``mma``'s "ieee" branch). True under the interpreter (it stores bf16 as
  raw uint16 bits: ``tl.dot`` and elementwise math on bf16 give garbage there) and, in the
  backward, for float32 inputs with a head dim > 128 on the GPU (3xTF32 tiles spill there).
* ``round_to``: the rounding of an fp32 tile to the input dtype that the GPU applies before a
  16-bit product (probabilities before P @ V, dS before dS @ K, ...), reproduced exactly under the
  interpreter, so its tests see the GPU's rounding error (the interpreter's own fp32 -> bf16
  conversion truncates instead of rounding to nearest even).
* ``mma``: the one ``tl.dot`` wrapper (fp32 accumulation; fp32 operands use ``tf32x3`` on the GPU:
  3 TF32 products, about 8x fp32's rounding error per product; for fp32 inputs the interpreter
  reproduces that decomposition in its operands (FP32_DOTS == 2, ``fp32_dots_mode``), so an
  fp32 tolerance failure on hardware shows on CPU first; 16-bit operands go to the tensor cores).
* Prefix modes: the values of ``ptk::PrefixMode`` in ``csrc/kernels/prefix_attention_params.cuh``
  (0 none, 1 shared, 2 one per batch row, 3 bank chosen by ``prefix_index``); ``prefix_of_row``
  maps a batch row to its prefix, the device twin of the C++ ``prefix_of_row``.
* ``tanh`` (soft-capping), ``load_tile``, dtype and block-size helpers, ``alloc`` (outputs poisoned
  with NaN when ``PTKERNELS_DEBUG_POISON=1``, so a kernel that forgets an element fails the tests),
  ``launch_first_fitting`` (deterministic configuration choice; configurations the GPU cannot hold
  are skipped).
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

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# ptk::PrefixMode (csrc/kernels/prefix_attention_params.cuh)
NO_PREFIX, SHARED_PREFIX, PER_ROW_PREFIX, BANK_PREFIX = 0, 1, 2, 3


def prefix_mode(prefix_k: torch.Tensor | None, prefix_index: torch.Tensor | None) -> int:
    """The prefix mode of a normalized call: prefix_k (T, Hkv, P, D) or None."""
    if prefix_k is None or prefix_k.shape[2] == 0:
        return NO_PREFIX
    if prefix_index is not None:
        return BANK_PREFIX
    return SHARED_PREFIX if prefix_k.shape[0] == 1 else PER_ROW_PREFIX


def fp32_dots_mode(dtype: torch.dtype, exact_on_gpu: bool = False) -> int:
    """The FP32_DOTS constexpr of a call with inputs of ``dtype`` (values in ``mma``): under the
    interpreter 1 for 16-bit inputs and 2 (tf32x3 modelled) for fp32 inputs the GPU multiplies
    with tf32x3; on the GPU 1 where a kernel multiplies exactly (``exact_on_gpu``), else 0."""
    if INTERPRET:
        return 2 if dtype == torch.float32 and not exact_on_gpu else 1
    return int(exact_on_gpu)


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


def table_arch_of(device) -> int:
    """The compute capability (major * 10 + minor) whose config tables a call on ``device``
    uses; the interpreter and CPU tensors follow the sm_80 tables."""
    if device.type == "cuda" and not INTERPRET:
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 80


def launch_first_fitting(cache: dict, key, candidates, run):
    """Launch ``run(cfg)`` with the configuration cached for ``key``, else with the first of
    ``candidates`` (the tables list them best guess first) that the GPU can hold: a candidate
    whose compile needs more shared memory or registers than the device has
    (``OutOfResources``, raised before anything runs) is skipped, never fatal. No timing: the
    same shapes and flags pick the same configuration in every run and on every rank, and a
    CUDA-graph capture never sees a benchmark."""
    from triton.runtime.errors import OutOfResources

    cfg = cache.get(key)
    if cfg is not None:
        return run(cfg)
    error = None
    for cfg in candidates:
        try:
            result = run(cfg)
        except OutOfResources as exc:
            error = exc
            continue
        cache[key] = cfg
        return result
    raise error if error is not None else ValueError(f"no launch configuration for {key}")


@triton.jit
def prefix_of_row(pidx_ptr, b, PREFIX_MODE: tl.constexpr):
    """The prefix t (int64) that batch row b reads: 0 (shared), b (one per row) or
    prefix_index[b] (bank). Unused (0) without a prefix."""
    if PREFIX_MODE == 3:
        t = tl.load(pidx_ptr + b).to(tl.int64)
    elif PREFIX_MODE == 2:
        t = b.to(tl.int64)
    else:
        t = b.to(tl.int64) * 0
    return t


@triton.jit
def tanh(x):
    """tanh from exp (portable: the interpreter has no libdevice): 1 - 2 / (exp(2x) + 1), exact
    limits +-1 where exp overflows or underflows."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def log2_scores(s, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k products -> scores in base 2 (log2(e) folded into the scale: one exp2 per score),
    soft-capped as softcap * tanh(s * scale / softcap). Returns (scores, t): t the tanh, which
    the backward's derivative needs (``score_grad``; without soft-capping a placeholder). The
    backward kernels use it; the forward keeps the same expression inline, since the helper
    moved its register allocation (up to +9 registers on the soft-capped tiles)."""
    if HAS_SOFTCAP:
        t = tanh(s * (scale / softcap))
        s2 = (softcap * LOG2E) * t
    else:
        t = s
        s2 = s * (scale * LOG2E)
    return s2, t


@triton.jit
def score_grad(ds, t, scale, HAS_SOFTCAP: tl.constexpr):
    """The gradient of the raw products from that of the scores (``log2_scores``'s t): times the
    tanh derivative 1 - t^2 under soft-capping, and the scale."""
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds * scale


@triton.jit
def load_tile(ptrs, mask, FP32_DOTS: tl.constexpr):
    """Masked load (0 where masked off); with FP32_DOTS upcast at once."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if FP32_DOTS:
        x = x.to(tl.float32)
    return x


@triton.jit
def round_to(x, DT: tl.constexpr, FP32_DOTS: tl.constexpr):
    """fp32 tile ``x`` rounded to dtype DT (round to nearest even, as the GPU converts).

    Without FP32_DOTS returns a DT tile (the tensor-core operand). With FP32_DOTS returns fp32
    holding the DT-rounded values: the interpreter then multiplies exactly what the GPU would.
    """
    if FP32_DOTS:
        if DT == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
        elif DT == tl.float16:
            y = x.to(tl.float16).to(tl.float32)
        else:
            y = x
    else:
        y = x.to(DT)
    return y


@triton.jit
def cast_rounded(x, DT: tl.constexpr, FP32_DOTS: tl.constexpr):
    """fp32 tile ``x`` as dtype DT for a store, rounded to nearest even also under the
    interpreter."""
    return round_to(x, DT, FP32_DOTS).to(DT)


_TF32_MASK = tl.constexpr(0xFFFFE000)  # the fp32 bits a TF32 value keeps (sign, 8 + 10)


@triton.jit
def tf32_rna(x):
    """fp32 ``x`` rounded to TF32, half away from zero (``cvt.rna.tf32.f32``)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & _TF32_MASK).to(tl.float32, bitcast=True)


@triton.jit
def tf32_trunc(x):
    """fp32 ``x`` as a TF32 tensor-core operand reads it (the low 13 mantissa bits ignored)."""
    return (x.to(tl.uint32, bitcast=True) & _TF32_MASK).to(tl.float32, bitcast=True)


@triton.jit
def mma(a, b, acc, FP32_DOTS: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    FP32_DOTS (``fp32_dots_mode``): 0: fp16/bf16 operands go to the tensor cores as they are,
    fp32 operands use ``tf32x3``. 1: both operands upcast to fp32 and multiplied exactly ("ieee";
    the GPU's exact-FMA path, and the interpreter for 16-bit inputs, whose values the upcast keeps
    exactly). 2 (the interpreter for fp32 inputs): Triton's tf32x3 decomposition computed as the
    tensor cores do it: big = rna(x), small = x - big read as TF32, acc + small_a big_b +
    big_a small_b + big_a big_b; so the interpreter tests see the GPU's fp32 error (about 2^-21
    relative per product instead of fp32's 2^-24) and a tolerance failure on hardware shows on
    CPU first.
    """
    if FP32_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if FP32_DOTS == 2:
            a_big = tf32_rna(a)
            b_big = tf32_rna(b)
            acc = tl.dot(tf32_trunc(a - a_big), b_big, acc, input_precision="ieee")
            acc = tl.dot(a_big, tf32_trunc(b - b_big), acc, input_precision="ieee")
            acc = tl.dot(a_big, b_big, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def aot_signature(kernel, pointer_types: dict, float_args=(), constexprs=None):
    """Signature dict for an AOT spec (``tests/triton_aot.py``): pointers as given, the names in
    ``float_args`` as fp32, every other non-constexpr parameter as i32."""
    constexprs = constexprs or {}
    sig = {}
    for a in kernel.arg_names:
        if a in constexprs:
            continue
        sig[a] = pointer_types.get(a) or ("fp32" if a in float_args else "i32")
    return sig


# JIT specializations that other call shapes produce, compiled by the AOT check for the first
# (most used) configuration of each attention kernel's bf16 D = 128 tables on sm_80 and sm_90
# (sm_86 runs sm_80's code): a head dim that is not a power of two (80, 96: D constexpr, columns
# masked in the BLOCK_D = 128 tile), sequence lengths not divisible by 16 (neither are the bias
# and padding-mask strides that contain them), and the head counts of MHA (G == 1: the JIT makes
# an argument equal to 1 a constant; 16-divisible head counts) and MQA (one KV head).
AOT_SHAPES = {
    "odd-lengths MHA": {"D": 80, "odd_lengths": True, "heads": "mha"},
    "MQA": {"D": 96, "odd_lengths": False, "heads": "mqa"},
}
_LENGTH_ARGS = ("Nq", "Nk", "n_cols", "s_bb", "s_bh", "s_bm", "s_kpmb")


def aot_shape_variants(variant: dict) -> list[dict]:
    """The ``AOT_SHAPES`` specializations of one AOT variant (format: tests/triton_aot.py)."""
    out = []
    for name, shape in AOT_SHAPES.items():
        sig, cx = dict(variant["signature"]), dict(variant["constexprs"], D=shape["D"])
        div16 = set(variant["div16"])
        if shape["odd_lengths"]:
            div16 -= set(_LENGTH_ARGS)
        one = {"mha": "G", "mqa": "Hkv"}[shape["heads"]]
        if one in sig:
            del sig[one]
            cx[one] = 1
        div16 |= {a for a in ("Hq", "Hkv", "G") if a in sig}
        bd = cx["BLOCK_D"]
        out.append(dict(variant, signature=sig, constexprs=cx,
                        div16=[a for a in sig if a in div16], shape=name,
                        label=variant["label"].replace(f"d{bd} ", f"d{shape['D']} ", 1)
                        + f" {name}"))
    return out
