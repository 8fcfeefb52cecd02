"""Building blocks shared by the two forward kernels of ``prefix_attention`` (the main kernel in
``attention_fwd.py`` and the split-K decode kernel in ``decode.py``): the online-softmax segment
loop, the query-block prologue and the row epilogue (device side); the normalized launch
arguments, the configuration choice and the AOT compile variants (host side).

Score pipeline (``attend_blocks``): ``s = q.k * scale``, soft-capping
``softcap * tanh(s / softcap)``, then ``+ attn_bias`` (read by its strides: the op hands over an
expanded view, never a materialized copy), masking, online softmax in base 2 (log2(e) folded
into the scale, ``exp2``), dropout on the probabilities (``dropout.py``), ``@ V`` with the
probabilities rounded to the input dtype (the tensor-core operand).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptkernels.backends.triton import configs
from ptkernels.backends.triton._common import (INTERPRET, LN2, LOG2E, aot_shape_variants,
                                              aot_signature, block_d, fp32_dots_mode,
                                              launch_first_fitting, mma, prefix_mode, round_to,
                                              strides, table_arch_of, tanh)
from ptkernels.backends.triton.dropout import dropout_keep, seed_from_tensor
from ptkernels.backends.triton.masks import mask_scores


@triton.jit
def bias_rows(bias_base, rows, s_bm, HAS_BIAS: tl.constexpr):
    """Pointers (BLOCK_M,) to bias[b, h, rows, 0]: the row offset in int64, since
    Nq * (P + Nk) passes 2^31 within one head at long sequences (bias_base itself when there is
    no bias: never read)."""
    if HAS_BIAS:
        ptrs = bias_base + rows.to(tl.int64) * s_bm
    else:
        ptrs = bias_base + rows * 0
    return ptrs


@triton.jit
def attend_blocks(acc, m_i, l_i, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd, lo, hi, ilo, ihi,
                  n_valid, col0, n_cols, rows, row_ok, bias_row_ptrs, s_bn, kpm_base, s_kpmn,
                  seed, bh, dropout_p, scale, softcap, window, q_off, D: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_SEQ: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  FP32_DOTS: tl.constexpr, SPLIT: tl.constexpr):
    """Online softmax of BLOCK_M query rows over the key blocks [lo, hi) of one segment.

    acc (BLOCK_M, BLOCK_D) fp32 unnormalized output; m_i, l_i (BLOCK_M,) fp32 running max (base 2)
    and sum; q (BLOCK_M, BLOCK_D); k_base/v_base point at key 0 of the segment for this (b, kv
    head); n_valid = keys in the segment (P or Nk); col0 = the segment's first column in
    [0, P + Nk) (bias and dropout columns); rows (BLOCK_M,) query indices, row_ok = rows < Nq;
    bias_row_ptrs (BLOCK_M,) pointers at bias[b, h_r, row, 0] (``bias_rows``; column stride
    s_bn); bh = b * Hq + h, the dropout stream: a scalar, or a (BLOCK_M, 1) column where the rows
    belong to several heads (the decode kernel's packed GQA rows); q_off = Nk - Nq (bottom-right
    causal).

    Blocks starting in [ilo, ihi) are interior: the caller guarantees that every key of them is
    in the segment and visible to every query row of the program (``interior_bounds``), so they
    skip the mask arithmetic (the (BLOCK_M, BLOCK_N) causal / window / tail compares and the
    select; FlashAttention-2's split of the key loop). The other blocks (the tail, the causal
    diagonal band, the window edge band) are masked to -inf. The split is a uniform branch in
    one loop, not separate loops: three pipelined loops in a row cost the light 128x64 sm_80
    config 32 registers and spills (the AOT check), one loop with the branch does not. The key
    padding mask, which no bound expresses, applies to every sequence block when present.
    Without SPLIT (a constexpr) every block is masked: the decode kernel's chunks, and head dims
    above 128, whose 32x32 w4 configs the branch pushes into spills.
    """
    DT: tl.constexpr = v_base.dtype.element_ty
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_valid
        kt = tl.load(k_base + cols[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if FP32_DOTS:
            kt = kt.to(tl.float32)
        s = mma(q, kt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), FP32_DOTS)
        if HAS_SOFTCAP:
            s = (softcap * LOG2E) * tanh(s * (scale / softcap))
        else:
            s = s * (scale * LOG2E)
        if HAS_BIAS:
            bias_ptrs = bias_row_ptrs[:, None] + ((col0 + cols).to(tl.int64) * s_bn)[None, :]
            bias = tl.load(bias_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * LOG2E
        if IS_SEQ and HAS_KPM:
            keep_key = tl.load(kpm_base + cols * s_kpmn, mask=col_ok, other=0)
            s = tl.where((keep_key != 0)[None, :], s, float("-inf"))
        if SPLIT:
            if (start < ilo) | (start >= ihi):  # a boundary block (a uniform branch)
                s = mask_scores(s, cols, col_ok, rows, q_off, window, IS_SEQ, CAUSAL,
                                HAS_WINDOW, False)
        else:
            s = mask_scores(s, cols, col_ok, rows, q_off, window, IS_SEQ, CAUSAL, HAS_WINDOW,
                            False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys (or -inf biases) keeps m = -inf: use 0 as its base
        # so that exp2(-inf - base) = 0 instead of NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_base)
        p = tl.exp2(s - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, bh, rows, col0, start, dropout_p, BLOCK_N)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_DOTS:
            v = v.to(tl.float32)
        acc = mma(round_to(p, DT, FP32_DOTS), v, acc * alpha[:, None], FP32_DOTS)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def start_query_block(q_ptr, s_qb, s_qh, s_qm, s_qd, b, h, m0, Nq, D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOTS: tl.constexpr):
    """Load the BLOCK_M query rows [m0, m0 + BLOCK_M) of (b, h) (both int64) and an empty
    softmax state.

    Returns rows, row_ok, offs_d, d_ok, q, acc (BLOCK_M, BLOCK_D) fp32, m_i = -inf, l_i = 0.
    """
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOTS:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return rows, row_ok, offs_d, d_ok, q, acc, m_i, l_i


@triton.jit
def finish_rows(acc, m_i, l_i):
    """Normalized output and natural-log lse; rows that saw no key give 0 and -inf."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    return out, lse


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

class Launch:
    """Normalized pointers, strides and flags of one call, shared by the main and decode paths.

    ``tensors``: q, k, v, pk, pv, pidx, kpm, bias (absent ones replaced by q, never read);
    ``strides``: s_q*, s_k*, s_v*, s_pk*, s_pv*, s_kpm*, s_b*; ``scalars``: Hq, Nq, Nk, P, G,
    seed, scale, softcap, dropout_p, window; ``flags``: the constexprs (D, PREFIX_MODE, ...).
    """

    def __init__(self, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                 dropout_seed, causal, window, softcap, scale, dropout_p):
        self.b, self.hq, self.nq, self.d = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        self.mode = prefix_mode(prefix_k, prefix_index)
        self.p = prefix_k.shape[2] if self.mode else 0
        self.block_d = block_d(self.d)
        dummy = q
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
        self.tensors = (q, k, v, prefix_k if self.mode else dummy, prefix_v if self.mode else dummy,
                        prefix_index if self.mode == 3 else dummy,
                        kpm if kpm is not None else dummy,
                        attn_bias if attn_bias is not None else dummy)
        self.strides = (*q.stride(), *k.stride(), *v.stride(),
                        *strides(prefix_k if self.mode else None, 4),
                        *strides(prefix_v if self.mode else None, 4),
                        *strides(kpm, 2), *strides(attn_bias, 4))
        self.seed = seed_from_tensor(dropout_seed) if dropout_p > 0 else 0
        self.scalars = (self.hq, self.nq, self.nk, self.p, self.hq // self.hkv,
                        self.seed, float(scale), float(softcap) if softcap > 0 else 1.0,
                        float(dropout_p), int(window) if window > 0 else 0)
        self.flags = dict(D=self.d, PREFIX_MODE=self.mode, CAUSAL=bool(causal),
                          HAS_WINDOW=window > 0, HAS_KPM=kpm is not None,
                          HAS_BIAS=attn_bias is not None, HAS_SOFTCAP=softcap > 0,
                          HAS_DROPOUT=dropout_p > 0, FP32_DOTS=fp32_dots_mode(q.dtype))
        self.dtype, self.device = q.dtype, q.device


def feature_class(flags: dict) -> str:
    """The configs.py table class of a call's flags (light, bias, softcap, dropout or heavy)."""
    return configs.feature_class(flags["HAS_BIAS"], flags["HAS_SOFTCAP"], flags["HAS_DROPOUT"])


_CHOSEN: dict = {}


def launch_with_config(kernel: str, launch: Launch, run, packed_rows: int | None = None) -> None:
    """Launch ``run(cfg)`` with this call's configuration: fixed under the interpreter, else the
    first candidate of the table for (arch, dtype, head dim, features) that the GPU can hold
    (``launch_first_fitting``: deterministic, no timing, no host synchronization). Decode passes
    its ``packed_rows`` (G * Nq), which pick the row block (``configs.decode_candidates``)."""
    if INTERPRET or launch.device.type != "cuda":
        return run(configs.INTERPRET[kernel])
    arch = table_arch_of(launch.device)
    cands = configs.candidates(kernel, arch, launch.dtype, launch.block_d,
                               feature_class(launch.flags))
    if packed_rows is not None:
        cands = configs.decode_candidates(cands, packed_rows)
    key = (kernel, arch, launch.dtype, launch.d, cands[0].block_m,
           tuple(sorted(k for k, v in launch.flags.items() if v is True)))
    return launch_first_fitting(_CHOSEN, key, cands, run)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/triton_aot.py): every config configs.py may pick, compiled
# as the JIT specializes a contiguous call with a power-of-two head dim (D = BLOCK_D constexpr,
# unit strides constexpr 1, pointers, strides and lengths divisible by 16), with the heaviest
# feature set its table serves.
# ----------------------------------------------------------------------------------------------

ALL_FEATURES = dict(PREFIX_MODE=3, CAUSAL=True, HAS_WINDOW=True, HAS_KPM=True, HAS_BIAS=True,
                    HAS_SOFTCAP=True, HAS_DROPOUT=True, FP32_DOTS=False)
LIGHT_FEATURES = dict(ALL_FEATURES, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_DROPOUT=False)
# Unit strides the JIT specializes to 1 for contiguous inputs (head dim, mask and bias columns).
UNIT_STRIDES = ("s_qd", "s_kd", "s_vd", "s_pkd", "s_pvd", "s_kpmn", "s_bn")
FLOAT_ARGS = ("scale", "softcap", "dropout_p")
# Integer arguments the JIT sees divisible by 16 in a typical call (strides of contiguous
# tensors with D % 16 == 0, sequence lengths such as 2048); the prefix length, the head counts
# and the seed are left unmarked (any value).
DIV16_INTS = ("Nq", "Nk", "n_cols", "chunk")


def aot_variants(kernel, kernel_kind: str, arch: int, extra_ptrs=None) -> list[dict]:
    """AOT compile variants (format: tests/triton_aot.py) of a forward kernel: every candidate of
    configs.py for sm_<arch>, each compiled with its table's feature set (``features`` in the
    variant: the configs.py class). A config that a one-feature class shares with the heavy
    class is compiled once, with all features: more registers, same tiles and stages. The light
    class's configs are always compiled light: they serve the common call, and the report shows
    their own registers and occupancy. fp32 has one table for every class: compiled with all
    features."""
    out, seen = [], {}
    heaviest_first = sorted(configs.FEATURE_CLASSES, key=lambda c: -len(configs.FEATURES[c]))
    for dtype in configs.DTYPES:
        dt = configs.aot_dtype(dtype)
        ptrs = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "pk_ptr": f"*{dt}",
                "pv_ptr": f"*{dt}", "pidx_ptr": "*i64", "kpm_ptr": "*u8", "bias_ptr": "*fp32",
                "out_ptr": f"*{dt}", "lse_ptr": "*fp32", **(extra_ptrs or {})}
        for bd in configs.HEAD_DIM_BUCKETS:
            for cls in heaviest_first:
                feats = set(configs.FEATURES[cls])
                for cfg in configs.candidates(kernel_kind, arch, dtype, bd, cls):
                    done = seen.get((dt, bd, cfg), ())
                    if feats in done or ((cls != "light" or dt == "fp32") and any(feats <= f for f in done)):
                        continue
                    seen.setdefault((dt, bd, cfg), []).append(feats)
                    cx = dict(LIGHT_FEATURES, **{f: True for f in feats}, BLOCK_M=cfg.block_m,
                              BLOCK_N=cfg.block_n, BLOCK_D=bd, D=bd,
                              **{s: 1 for s in UNIT_STRIDES})
                    cx = {k: v for k, v in cx.items() if k in kernel.arg_names}
                    sig = aot_signature(kernel, ptrs, FLOAT_ARGS, cx)
                    div16 = [a for a in sig if a in ptrs or a in DIV16_INTS
                             or (a.startswith("s_") and sig[a] == "i32")]
                    label = {"heavy": "all-features"}.get(cls, cls)
                    out.append({"label": f"{dt} d{bd} {label}", "config": str(cfg),
                                "features": cls, "dtype": dt, "block_d": bd,
                                "signature": sig, "constexprs": cx, "div16": div16,
                                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                "tensor_cores": True, "async_loads": cfg.num_stages > 1})
                    first = cfg == configs.candidates(kernel_kind, arch, dtype, bd, cls)[0]
                    if (dt, bd) == ("bf16", 128) and first and configs.table_arch(arch) != 86:
                        out += aot_shape_variants(out[-1])
    return out
