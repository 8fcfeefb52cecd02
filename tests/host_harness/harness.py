"""Build and drive the host harness: csrc/kernels/*.cuh compiled by g++ with the SIMT shim.

``build(defines=())`` compiles ``harness.cpp`` into a shared library (cached by a hash of the
sources and flags) and loads it with ctypes. ``HarnessBackend(lib)`` is a backend module in the
sense of ``ptkernels.backends`` (same four functions, same normalized arguments as the ``cuda``
backend), so the shared test machinery (``tests/attention_cases.py``) judges the real kernel code.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KERNELS = ROOT / "csrc" / "kernels"
CUDA_HOME = os.environ.get("CUDA_HOME") or "/usr/local/cuda"

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def cuda_headers_present() -> bool:
    return Path(CUDA_HOME, "include", "cuda_fp16.h").exists()


def _sources():
    return sorted(KERNELS.glob("*.cuh")) + sorted(HERE.glob("*.h")) + [HERE / "harness.cpp"]


def build(defines=()) -> ctypes.CDLL:
    """Compile (or reuse) the harness library with the given -D macros; returns the loaded CDLL."""
    cxx = compiler()
    flags = ["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-DPTK_HOST_HARNESS",
             *[f"-D{d}" for d in defines], f"-I{HERE}", f"-I{KERNELS}", f"-I{CUDA_HOME}/include"]
    h = hashlib.sha256(" ".join([cxx, *flags]).encode())
    for src in _sources():
        h.update(src.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / f"ptk_host_harness_{os.getuid()}"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"harness_{h.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, *flags, str(HERE / "harness.cpp"), "-o", str(tmp)], check=True,
                       capture_output=True, text=True)
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _strides(t, n):
    return list(t.stride()) if t is not None else [0] * n


class HarnessBackend:
    """A ``ptkernels.backends`` module whose kernels are the harness-compiled .cuh kernels."""

    NAME = "cuda_harness"

    def __init__(self, lib: ctypes.CDLL, force_splits: int = 0):
        self.lib = lib
        self.force_splits = force_splits  # > 0: the forward uses split-K with this many splits

    def is_available(self, op, device):
        return device.type == "cpu", "host harness (CPU tensors only)"

    def _check(self, rc):
        if rc != 0:
            self.lib.ptk_last_error.restype = ctypes.c_char_p
            msg = self.lib.ptk_last_error().decode()
            raise RuntimeError(f"host harness call failed with code {rc}: {msg}")

    # ---- prefix attention ----
    def _call(self, fn, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
              causal, window, softcap, scale, out=None, lse=None, grad_out=None, grad_lse=None,
              delta=None, dq=None, dk=None, dv=None, dpk=None, dpv=None, extra=()):
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        if prefix_k is None:
            mode, t, p = 0, 0, 0
        else:
            t, p = prefix_k.shape[0], prefix_k.shape[2]
            mode = 3 if prefix_index is not None else (1 if t == 1 else 2)
        ptrs = [q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, out, lse,
                grad_out, grad_lse, delta, dq, dk, dv, dpk, dpv]
        ints = [b, hq, hkv, nq, nk, p, d, t, mode, int(causal), int(window)]
        for x in (q, k, v, prefix_k, prefix_v, out, grad_out, attn_bias):
            ints += _strides(x, 4)
        ints += _strides(key_padding_mask, 2)
        ptr_arr = (ctypes.c_void_p * len(ptrs))(*[None if x is None else x.data_ptr() for x in ptrs])
        int_arr = (ctypes.c_int64 * len(ints))(*ints)
        flt_arr = (ctypes.c_double * 2)(float(softcap), float(scale))
        rc = fn(ctypes.c_int(DTYPES[q.dtype]), ptr_arr, int_arr, flt_arr, *extra)
        self._check(rc)

    @staticmethod
    def _norm(key_padding_mask, attn_bias, prefix_index):
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if attn_bias is not None and attn_bias.dtype != torch.float32:
            attn_bias = attn_bias.to(torch.float32)
        if prefix_index is not None:
            prefix_index = prefix_index.to(torch.int64).contiguous()
        return key_padding_mask, attn_bias, prefix_index

    def prefix_attention_fwd(self, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                             attn_bias, dropout_seed, causal, window, softcap, scale, dropout_p):
        if dropout_p > 0:
            raise NotImplementedError("dropout is not implemented by the CUDA kernels")
        key_padding_mask, attn_bias, prefix_index = self._norm(key_padding_mask, attn_bias, prefix_index)
        out = torch.full(q.shape, float("nan"), dtype=q.dtype)      # poisoned
        lse = torch.full(q.shape[:-1], float("nan"), dtype=torch.float32)
        self._call(self.lib.ptk_attn_fwd, q, k, v, prefix_k, prefix_v, prefix_index,
                   key_padding_mask, attn_bias, causal, window, softcap, scale, out=out, lse=lse,
                   extra=(ctypes.c_int(self.force_splits),))
        return out, lse

    def prefix_attention_bwd(self, grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index,
                             key_padding_mask, attn_bias, dropout_seed, out, lse, causal, window,
                             softcap, scale, dropout_p, output_mask):
        if dropout_p > 0:
            raise NotImplementedError("dropout is not implemented by the CUDA kernels")
        need_dq, need_dk, need_dv, need_dpk, need_dpv = (bool(x) for x in output_mask)
        has_prefix = prefix_k is not None
        need_dpk, need_dpv = need_dpk and has_prefix, need_dpv and has_prefix
        key_padding_mask, attn_bias, prefix_index = self._norm(key_padding_mask, attn_bias, prefix_index)
        # The kernels write every element of the gradients they compute; an empty problem
        # (Nq == 0) computes nothing, so those start at zero rather than poisoned.
        fill = 0.0 if q.shape[2] == 0 else float("nan")

        def alloc(like, need):
            return torch.full(like.shape, fill, dtype=like.dtype) if need else None

        dq, dk, dv = alloc(q, need_dq), alloc(k, need_dk), alloc(v, need_dv)
        dpk = alloc(prefix_k, need_dpk) if has_prefix else None
        dpv = alloc(prefix_v, need_dpv) if has_prefix else None
        if grad_lse is not None:
            grad_lse = grad_lse.to(torch.float32).contiguous()
        delta = torch.empty(q.shape[:-1], dtype=torch.float32)
        self._call(self.lib.ptk_attn_bwd, q, k, v, prefix_k, prefix_v, prefix_index,
                   key_padding_mask, attn_bias, causal, window, softcap, scale, out=out,
                   lse=lse.to(torch.float32).contiguous(), grad_out=grad_out, grad_lse=grad_lse,
                   delta=delta, dq=dq, dk=dk, dv=dv, dpk=dpk, dpv=dpv,
                   extra=(ctypes.c_int(int(need_dq)),))
        # a fresh empty tensor per unused gradient: custom-op outputs must not alias each other
        return tuple(x if x is not None else q.new_empty(0) for x in (dq, dk, dv, dpk, dpv))

    # ---- GPC cell ----
    VARIANTS = {"lstm": 0, "candidate": 1, "gru": 2, "reinject": 3}
    GATES = {"lstm": 2, "candidate": 3, "gru": 1, "reinject": 2}

    def _gpc_call(self, fn, update, state, weight, bias, variant, new_state=None, preact=None,
                  grad_new_state=None, da=None, gu=None, gs=None, grad_update=None,
                  grad_state=None, grad_weight=None, grad_bias=None):
        b, m, d = update.shape
        shared = state.dim() == 2
        s_strides = [0, *state.stride()] if shared else list(state.stride())
        ptrs = [update, state, weight, bias, new_state, preact, grad_new_state, da, gu, gs,
                grad_update, grad_state, grad_weight, grad_bias]
        ints = [b, m, d, self.VARIANTS[variant], int(shared), *update.stride(), *s_strides,
                *weight.stride(), bias.stride(0), *_strides(grad_new_state, 3)]
        ptr_arr = (ctypes.c_void_p * len(ptrs))(*[None if x is None else x.data_ptr() for x in ptrs])
        int_arr = (ctypes.c_int64 * len(ints))(*ints)
        rc = fn(ctypes.c_int(DTYPES[update.dtype]), ptr_arr, int_arr)
        self._check(rc)

    def gpc_cell_fwd(self, update, state, weight, bias, variant):
        g = self.GATES[variant]
        b, m, d = update.shape
        new_state = torch.full(update.shape, float("nan"), dtype=update.dtype)
        preact = torch.full((b, m, g * d), float("nan"), dtype=torch.float32)
        self._gpc_call(self.lib.ptk_gpc_fwd, update, state, weight, bias, variant,
                       new_state=new_state, preact=preact)
        return new_state, preact

    def gpc_cell_bwd(self, grad_new_state, update, state, weight, bias, preact, variant,
                     output_mask):
        need_u, need_s, need_w, need_b = (bool(x) for x in output_mask)
        g = self.GATES[variant]
        b, m, d = update.shape
        rows = b * m

        def alloc(like, need):
            return torch.full(like.shape, float("nan"), dtype=like.dtype) if need else None

        gu_, gs_, gw_, gb_ = alloc(update, need_u), alloc(state, need_s), alloc(weight, need_w), alloc(bias, need_b)
        self._gpc_call(self.lib.ptk_gpc_bwd, update, state, weight, bias, variant,
                       preact=preact.to(torch.float32).contiguous(), grad_new_state=grad_new_state,
                       da=torch.empty(rows, g * d), gu=torch.empty(rows, d), gs=torch.empty(rows, d),
                       grad_update=gu_, grad_state=gs_, grad_weight=gw_, grad_bias=gb_)
        return tuple(x if x is not None else update.new_empty(0) for x in (gu_, gs_, gw_, gb_))
