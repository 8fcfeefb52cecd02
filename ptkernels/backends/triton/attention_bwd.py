"""Triton backward of ``ptkernels::prefix_attention_bwd`` (the op conventions are in
``ptkernels/ops/prefix_attention.py``; the semantics are ``ptkernels.backends.eager``'s).

Kernels, each writing its outputs once (no atomics, deterministic):

* ``_bwd_preprocess_kernel``: delta = rowsum(dO * O) - grad_lse, float32 (B, Hq, Nq).
* ``_bwd_dq_kernel``: grid (cdiv(Nq, BM) * B * Hq,); a query block loops over the prefix keys of
  its row's prefix, then over the sequence key blocks it can see (causal/window block skipping).
* ``_bwd_dkdv_kernel``: grid (cdiv(Nk, BN) * B * Hkv,); a sequence key block loops over the G query
  heads of its KV head (GQA reduction in registers) and the query blocks that can see it.
* ``_bwd_dprefix_kernel`` (``attention_bwd_prefix.py``): dprefix_k / dprefix_v, contraction over
  every query row of every batch row using that prefix.

Given the final lse and delta each segment's backward is independent, so the prompt-only
backward (only dprefix_k / dprefix_v requested: q, k, v frozen) launches just the preprocess and
the prefix kernel; the dQ and dK/dV kernels, whose cost grows with Nq * Nk, never run. In matrix
products: the full backward costs 2 * D * 7 * (S + R) FLOPs per head (dQ: 3 products over the S
visible sequence pairs and the R = Nq * P prefix pairs; dK/dV: 4 over S; dprefix: 4 over R), the
prompt-only one 2 * D * 4 * R: e.g. 3.4% of it for Nq = Nk = 2048 causal, P = 64.

Grids fold (batch, head) into axis 0 (no 65,535 limit on B * Hq). Configurations: one table per
kernel, arch (sm_80 / sm_90), dtype class and head-dim bucket (``candidates``); the first that
the GPU can hold runs (``_run``: deterministic, no timing); a fixed small one under the
interpreter. All are compiled ahead of time by tests/test_triton_aot.py (``AOT_SPECS``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptkernels.backends.triton import configs
from ptkernels.backends.triton._common import (INTERPRET, LOG2E, SIG_DTYPE, aot_signature, alloc,
                                              block_d, cast_rounded, launch_first_fitting,
                                              load_tile, mma, prefix_mode, prefix_of_row,
                                              round_to, strides, tanh)
from ptkernels.backends.triton.configs import Config
from ptkernels.backends.triton.attention_bwd_prefix import _bwd_dprefix_kernel, _key_block_step
from ptkernels.backends.triton.dropout import dropout_keep, seed_from_tensor


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(o_ptr, do_ptr, glse_ptr, delta_ptr,
                           s_ob, s_oh, s_om, s_od, s_dob, s_doh, s_dom, s_dod, s_gb, s_gh, s_gm,
                           Hq, Nq, D: tl.constexpr,
                           HAS_GLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M) * B * Hq,). delta (B, Hq, Nq) float32, contiguous."""
    n_mb = tl.cdiv(Nq, BLOCK_M)
    pid_m = tl.program_id(0) % n_mb
    bh = tl.program_id(0) // n_mb
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    md = row_ok[:, None] & (offs_d[None, :] < D)
    o = tl.load(o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
                mask=md, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod,
                 mask=md, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_GLSE:
        delta -= tl.load(glse_ptr + b * s_gb + h * s_gh + offs_m * s_gm, mask=row_ok,
                         other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * Nq + offs_m, delta, mask=row_ok)


@triton.jit
def _dq_block_step(dq, q, do, lse2, delta, k_base, v_base, bias_base, kpm_base,
                   s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, s_kpm,
                   n0, offs_m, row_ok, b, h, Hq, Nseg, D: tl.constexpr, diag_off, window,
                   scale, softcap, dropout_p, seed, row_len, col0,
                   HAS_KPM: tl.constexpr, MASK_CAUSAL: tl.constexpr, MASK_WINDOW: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   FP32_DOTS: tl.constexpr):
    """dQ contribution of the key block [n0, n0 + BLOCK_N) of one segment (prefix: col0 = 0,
    sequence: col0 = P). q, do (BM, BLOCK_D) tiles; lse2 = lse * log2(e) (+inf on empty rows),
    delta (BM,)."""
    DT: tl.constexpr = k_base.dtype.element_ty
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_seg = offs_n < Nseg
    nd = in_seg[:, None] & (offs_d[None, :] < D)
    k = load_tile(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, nd, FP32_DOTS)
    v = load_tile(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, nd, FP32_DOTS)
    col_valid = in_seg
    if HAS_KPM:
        col_valid = col_valid & (tl.load(kpm_base + offs_n * s_kpm, mask=in_seg, other=0) != 0)

    s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), FP32_DOTS)
    # base 2 (log2(e) folded into the scale, lse2 = lse * log2(e)): one exp2 per score
    if HAS_SOFTCAP:
        t = tanh(s * (scale / softcap))
        s = (softcap * LOG2E) * t
    else:
        s = s * (scale * LOG2E)
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn,
                       mask=row_ok[:, None] & in_seg[None, :], other=0.0).to(tl.float32)
        s = s + bias * LOG2E
    visible = row_ok[:, None] & col_valid[None, :]
    if MASK_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag_off)
    if MASK_WINDOW:
        visible = visible & (offs_m[:, None] + diag_off - offs_n[None, :] < window)
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), FP32_DOTS)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, b * Hq + h, offs_m, col0 + offs_n, row_len, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    ds = ds * scale
    return mma(round_to(ds, DT, FP32_DOTS), k, dq, FP32_DOTS)


@triton.jit
def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pidx_ptr, kpm_ptr, bias_ptr, do_ptr, lse_ptr,
        delta_ptr, dq_ptr,
        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
        s_pkt, s_pkh, s_pkn, s_pkd, s_pvt, s_pvh, s_pvn, s_pvd,
        s_kpmb, s_kpmn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod,
        s_dqb, s_dqh, s_dqm, s_dqd,
        Hq, Hkv, Nq, Nk, P, window, scale, softcap, dropout_p, seed,
        D: tl.constexpr,
        PREFIX_MODE: tl.constexpr,  # ptk::PrefixMode: 0 none, 1 shared, 2 per row, 3 bank
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_DROPOUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32_DOTS: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M) * B * Hq,). dq (B, Hq, Nq, D) in q's dtype."""
    n_mb = tl.cdiv(Nq, BLOCK_M)
    pid_m = tl.program_id(0) % n_mb
    bh = tl.program_id(0) // n_mb
    b = bh // Hq
    h = (bh % Hq).to(tl.int64)
    hk = h // (Hq // Hkv)
    b64 = b.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    md = row_ok[:, None] & (offs_d[None, :] < D)
    q = load_tile(q_ptr + b64 * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
              md, FP32_DOTS)
    do = load_tile(do_ptr + b64 * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod,
               md, FP32_DOTS)
    lse = tl.load(lse_ptr + (b64 * Hq + h) * Nq + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: p = 0
    lse2 = lse * LOG2E
    delta = tl.load(delta_ptr + (b64 * Hq + h) * Nq + offs_m, mask=row_ok, other=0.0)
    bias_base = bias_ptr + b64 * s_bb + h * s_bh
    row_len = P + Nk
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if PREFIX_MODE != 0:
        t = prefix_of_row(pidx_ptr, b64, PREFIX_MODE)
        pk_base = pk_ptr + t * s_pkt + hk * s_pkh
        pv_base = pv_ptr + t * s_pvt + hk * s_pvh
        for n0 in range(0, P, BLOCK_N):
            dq = _dq_block_step(dq, q, do, lse2, delta, pk_base, pv_base, bias_base, kpm_ptr,
                                s_pkn, s_pkd, s_pvn, s_pvd, s_bm, s_bn, 0,
                                n0, offs_m, row_ok, b, h, Hq, P, D, 0, 0,
                                scale, softcap, dropout_p, seed, row_len, 0,
                                False, False, False, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT,
                                BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)

    # Sequence keys this query block can see: bottom-right causal j <= i + (Nk - Nq); window
    # (i + Nk - Nq) - j < window. Blocks outside [n_lo, n_hi) are skipped.
    diag_off = Nk - Nq
    n_hi = Nk
    if CAUSAL:
        n_hi = tl.minimum(n_hi, m0 + BLOCK_M + diag_off)
    n_lo = 0
    if HAS_WINDOW:
        n_lo = tl.maximum(m0 + diag_off - window + 1, 0)
        n_lo = (n_lo // BLOCK_N) * BLOCK_N
    k_base = k_ptr + b64 * s_kb + hk * s_kh
    v_base = v_ptr + b64 * s_vb + hk * s_vh
    for n0 in range(n_lo, n_hi, BLOCK_N):
        dq = _dq_block_step(dq, q, do, lse2, delta, k_base, v_base, bias_base + P * s_bn,
                            kpm_ptr + b64 * s_kpmb, s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, s_kpmn,
                            n0, offs_m, row_ok, b, h, Hq, Nk, D, diag_off, window,
                            scale, softcap, dropout_p, seed, row_len, P,
                            HAS_KPM, CAUSAL, HAS_WINDOW, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT,
                            BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
    tl.store(dq_ptr + b64 * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             cast_rounded(dq, dq_ptr.dtype.element_ty, FP32_DOTS), mask=md)


@triton.jit
def _bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, kpm_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
        s_kpmb, s_kpmn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod,
        s_gb, s_gh, s_gn, s_gd,  # dk and dv: same (contiguous) layout
        Hq, Hkv, Nq, Nk, P, window, scale, softcap, dropout_p, seed,
        D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32_DOTS: tl.constexpr):
    """Grid (cdiv(Nk, BLOCK_N) * B * Hkv,). dk, dv (B, Hkv, Nk, D) in k's / v's dtype."""
    n_nb = tl.cdiv(Nk, BLOCK_N)
    pid_n = tl.program_id(0) % n_nb
    bhk = tl.program_id(0) // n_nb
    b = bhk // Hkv
    hk = (bhk % Hkv).to(tl.int64)
    b64 = b.to(tl.int64)
    G = Hq // Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_seg = offs_n < Nk
    nd = in_seg[:, None] & (offs_d[None, :] < D)
    k = load_tile(k_ptr + b64 * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
              nd, FP32_DOTS)
    v = load_tile(v_ptr + b64 * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
              nd, FP32_DOTS)
    col_valid = in_seg
    if HAS_KPM:
        col_valid = col_valid & (tl.load(kpm_ptr + b64 * s_kpmb + offs_n * s_kpmn, mask=in_seg,
                                         other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Queries that can see this key block: causal i >= j - (Nk - Nq); window
    # i < j + window - (Nk - Nq). Query blocks outside [m_lo, m_hi) are skipped.
    diag_off = Nk - Nq
    m_lo = 0
    if CAUSAL:
        m_lo = tl.maximum(n0 - diag_off, 0)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
    m_hi = Nq
    if HAS_WINDOW:
        m_hi = tl.minimum(m_hi, n0 + BLOCK_N - 1 + window - diag_off)
    row_len = P + Nk
    for g in range(0, G):
        h = hk * G + g
        q_base = q_ptr + b64 * s_qb + h * s_qh
        do_base = do_ptr + b64 * s_dob + h * s_doh
        lse_base = lse_ptr + (b64 * Hq + h) * Nq
        delta_base = delta_ptr + (b64 * Hq + h) * Nq
        bias_base = bias_ptr + b64 * s_bb + h * s_bh + P * s_bn
        for m0 in range(m_lo, m_hi, BLOCK_M):
            dk, dv = _key_block_step(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base,
                s_qm, s_qd, s_dom, s_dod, s_bm, s_bn,
                m0, offs_n, col_valid, b, h, Hq, Nq, D, diag_off, window,
                scale, softcap, dropout_p, seed, row_len, P,
                CAUSAL, HAS_WINDOW, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, NEED_DK, NEED_DV,
                BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
    out_off = b64 * s_gb + hk * s_gh + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd
    if NEED_DK:
        tl.store(dk_ptr + out_off, cast_rounded(dk, dk_ptr.dtype.element_ty, FP32_DOTS), mask=nd)
    if NEED_DV:
        tl.store(dv_ptr + out_off, cast_rounded(dv, dv_ptr.dtype.element_ty, FP32_DOTS), mask=nd)


# ----------------------------------------------------------------------------------------------
# Configurations (same form as configs.py's forward tables)
# ----------------------------------------------------------------------------------------------

# Config(block_m, block_n, num_warps, num_stages) per kernel, arch, dtype class and head-dim
# bucket (BLOCK_D upper bound), best guess first (the first one the GPU can hold runs).
# "16bit_heavy" serves calls with an attention bias, soft-capping or dropout and "16bit" the
# others (light: no bias tile, tanh or Philox state, so larger pipelined tiles fit); fp32 tiles
# serve both. Every entry compiles for its arch with the heaviest feature set of its table and
# no register spills (AOT_SPECS below, tests/test_triton_aot.py), which is what keeps the heavy
# tiles small: dK/dV programs hold K, V and two float32 (BLOCK_N, D) accumulators for their whole
# life, and 3xTF32 (float32 inputs) needs split operands. float32 with D >= 128 runs with
# FP32_DOTS (exact fp32 FMA dots, no tensor cores: every tf32x3 dQ tile spilled on sm_90 there).
_C = Config
_FP32 = {
    "dq": {64: [_C(32, 32, 4, 2)], 128: [_C(16, 16, 8, 1)], 256: [_C(16, 16, 8, 1)]},
    "dkdv": {64: [_C(16, 32, 4, 1)], 128: [_C(16, 16, 8, 1)], 256: [_C(16, 16, 8, 1)]},
    "dprefix": {64: [_C(16, 32, 8, 1)], 128: [_C(16, 16, 8, 1)], 256: [_C(16, 16, 4, 1)]},
}
# sm_90's ptxas spills the D = 256 prefix kernel with 4 warps (sm_80's spills it with 8)
_FP32_90 = dict(_FP32, dprefix={**_FP32["dprefix"], 256: [_C(16, 16, 8, 1)]})
_HEAVY = {
    "dq": {64: [_C(64, 32, 4, 2), _C(128, 32, 8, 2)], 128: [_C(64, 32, 8, 2), _C(32, 32, 4, 2)],
           256: [_C(32, 32, 4, 1)]},
    "dkdv": {64: [_C(16, 64, 4, 1)], 128: [_C(16, 64, 8, 1)], 256: [_C(16, 32, 4, 1)]},
    # the prefix kernel's three nested loops (rows, GQA heads, query blocks) cost a few more
    # registers: wider warps at D = 256
    "dprefix": {64: [_C(16, 64, 4, 1)], 128: [_C(16, 64, 8, 1)], 256: [_C(16, 32, 8, 1)]},
}
_HEAVY_90 = dict(_HEAVY, dkdv={**_HEAVY["dkdv"], 64: [_C(16, 64, 4, 1), _C(32, 64, 4, 1)]},
                 dq={**_HEAVY["dq"], 128: [_C(64, 32, 4, 2)]})
# Light calls: pipelined (3-stage, cp.async) tiles. sm_90 holds 32x128 dK/dV tiles (wgmma reads
# its operands from shared memory); on sm_80 / sm_86 they spill, 32x64 with 8 warps does not.
_LIGHT = {
    "dq": {64: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)], 128: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)],
           256: [_C(32, 32, 4, 1)]},
    "dkdv": {64: [_C(32, 64, 8, 3), _C(16, 64, 4, 1)], 128: [_C(32, 64, 8, 3), _C(16, 64, 8, 1)],
             256: [_C(16, 32, 4, 1)]},
    "dprefix": {64: [_C(32, 64, 8, 3), _C(16, 64, 4, 1)],
                128: [_C(32, 64, 8, 3), _C(16, 64, 8, 1)], 256: [_C(16, 32, 8, 1)]},
}
_LIGHT_90 = dict(_LIGHT, **{k: {**_LIGHT[k], 64: [_C(32, 128, 8, 3), _C(16, 64, 4, 1)],
                                128: [_C(32, 128, 8, 3), _C(16, 64, 8, 1)]}
                            for k in ("dkdv", "dprefix")})


def _tables(light, heavy, fp32):
    return {k: {"16bit": light[k], "16bit_heavy": heavy[k], "fp32": fp32[k]} for k in light}


_BWD = {80: _tables(_LIGHT, _HEAVY, _FP32), 86: _tables(_LIGHT, _HEAVY, _FP32),
        90: _tables(_LIGHT_90, _HEAVY_90, _FP32_90)}
# The interpreter: one fixed small configuration (tests may change it to exercise more tiles).
INTERPRET_CONFIG = Config(32, 32, 4, 1)


def fp32_dots(dtype: torch.dtype, block_d: int) -> bool:
    """Whether the kernels multiply in exact fp32 (see attention_bwd_prefix.py)."""
    return INTERPRET or (dtype == torch.float32 and block_d >= 128)


def candidates(kernel: str, arch: int, dtype: torch.dtype, block_d: int,
               heavy: bool = True) -> list[Config]:
    """Every configuration the backward may run ``kernel`` ("dq", "dkdv", "dprefix") with;
    ``heavy`` = the call has an attention bias, soft-capping or dropout."""
    table = _BWD[configs.table_arch(arch)][kernel]
    bucket = next(ub for ub in configs.HEAD_DIM_BUCKETS if block_d <= ub)
    cls = "fp32" if dtype == torch.float32 else ("16bit_heavy" if heavy else "16bit")
    return list(table[cls][bucket])


_CHOSEN: dict = {}


def _preprocess_block_m(bd: int) -> int:
    """Rows per preprocess program: two (BLOCK_M, BLOCK_D) fp32 tiles stay at 64 registers a
    thread with 4 warps."""
    return max(16, 4096 // bd)


def _launch(name: str, kernel, grid, *args, **kwargs):
    """The single launch point of this module (tests spy on it to count launches per kernel)."""
    kernel[grid](*args, **kwargs)


def _run(name: str, kernel, grid_fn, key: tuple, dtype, block_d: int, device, *args, **kwargs):
    """Launch ``kernel`` with the configuration for this call: fixed under the interpreter, else
    the first candidate the GPU can hold (``launch_first_fitting``: deterministic, no timing)."""
    def run(cfg):
        _launch(name, kernel, grid_fn(cfg), *args, **kwargs, BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if INTERPRET or device.type != "cuda":
        return run(INTERPRET_CONFIG)
    major, minor = torch.cuda.get_device_capability(device)
    arch = major * 10 + minor
    heavy = bool(kwargs["HAS_BIAS"] or kwargs["HAS_SOFTCAP"] or kwargs["HAS_DROPOUT"])
    launch_first_fitting(_CHOSEN, (name, arch, dtype, block_d) + key,
                         candidates(name, arch, dtype, block_d, heavy), run)


def _prefix_split(num_programs: int, nq: int, device) -> int:
    """Split the prefix kernel's query contraction over NSPLIT programs when its grid (T * Hkv *
    cdiv(P, BLOCK_N)) is too small to fill the GPU; partials are summed in a fixed order."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(nq, 128), (2 * sms) // max(num_programs, 1), 16))


def _bank_rows(prefix_index: torch.Tensor, t: int):
    """The batch rows of each bank prefix, sorted by prefix (int32 (B,)), and where prefix t's
    rows start (int32 (T + 1,)). Device-side only (no ``bincount``, whose output size needs a
    host synchronization): row_start[t] = number of rows with a prefix < t."""
    rows = torch.argsort(prefix_index, stable=True)
    sorted_index = prefix_index[rows]
    bounds = torch.arange(t + 1, device=prefix_index.device, dtype=sorted_index.dtype)
    row_start = torch.searchsorted(sorted_index, bounds).to(torch.int32)
    return rows.to(torch.int32), row_start


# ----------------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------------

def prefix_attention_bwd(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index,
                         key_padding_mask, attn_bias, dropout_seed, out, lse, causal, window,
                         softcap, scale, dropout_p, output_mask):
    """Backend entry point (signature and semantics of ``ptkernels.backends.eager``'s).

    Shapes: q, out, grad_out (B, Hq, Nq, D); k, v (B, Hkv, Nk, D); prefix_k/v (T, Hkv, P, D) or
    None; lse, grad_lse (B, Hq, Nq). Returns (dq, dk, dv, dprefix_k, dprefix_v) in the inputs'
    dtypes, an empty tensor for each gradient ``output_mask`` does not ask for.
    """
    need_dq, need_dk, need_dv, need_dpk, need_dpv = (bool(x) for x in output_mask)
    has_prefix = prefix_k is not None and prefix_k.shape[2] > 0
    need_dpk, need_dpv = need_dpk and has_prefix, need_dpv and has_prefix
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    p_len = prefix_k.shape[2] if has_prefix else 0
    dev = q.device
    bd = block_d(d)
    dummy = q  # stands in for absent tensors (never read: their flag is off)

    def grad_buf(x, need):
        return alloc(x.shape, x.dtype, dev) if need else q.new_empty(0)

    dq = grad_buf(q, need_dq)
    dk, dv = grad_buf(k, need_dk), grad_buf(v, need_dv)
    dpk = grad_buf(prefix_k, need_dpk) if prefix_k is not None else q.new_empty(0)
    dpv = grad_buf(prefix_v, need_dpv) if prefix_v is not None else q.new_empty(0)
    if b * hq * nq == 0 or not (need_dq or need_dk or need_dv or need_dpk or need_dpv):
        return tuple(g.zero_() for g in (dq, dk, dv, dpk, dpv))

    mode = prefix_mode(prefix_k, prefix_index)
    seed = seed_from_tensor(dropout_seed) if dropout_p > 0 else 0
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    lse = lse.contiguous()
    opts = dict(window=window if window > 0 else 0, scale=float(scale),
                softcap=float(softcap) if softcap > 0 else 1.0, dropout_p=float(dropout_p),
                seed=seed)
    flags = dict(HAS_BIAS=attn_bias is not None, HAS_SOFTCAP=softcap > 0,
                 HAS_DROPOUT=dropout_p > 0, D=d, BLOCK_D=bd, FP32_DOTS=fp32_dots(q.dtype, bd))
    tune_key = (d, tuple(sorted(k for k, v in flags.items() if v is True)))

    delta = torch.empty((b, hq, nq), dtype=torch.float32, device=dev)
    pre_m = _preprocess_block_m(bd)
    _launch("preprocess", _bwd_preprocess_kernel, (triton.cdiv(nq, pre_m) * b * hq,),
            out, grad_out, grad_lse if grad_lse is not None else dummy, delta,
            *out.stride(), *grad_out.stride(), *strides(grad_lse, 3), hq, nq, D=d,
            HAS_GLSE=grad_lse is not None, BLOCK_M=pre_m, BLOCK_D=bd, num_warps=4)

    bias = attn_bias if attn_bias is not None else dummy
    s_bias = strides(attn_bias, 4)
    kpm_t = kpm if kpm is not None else dummy

    if need_dq:
        _run("dq", _bwd_dq_kernel, lambda c: (triton.cdiv(nq, c.block_m) * b * hq,),
             tune_key + (mode,),
             q.dtype, bd, dev,
             q, k, v, prefix_k if has_prefix else dummy, prefix_v if has_prefix else dummy,
             prefix_index if mode == 3 else dummy, kpm_t, bias, grad_out, lse, delta, dq,
             *q.stride(), *k.stride(), *v.stride(), *strides(prefix_k if has_prefix else None, 4),
             *strides(prefix_v if has_prefix else None, 4), *strides(kpm, 2), *s_bias,
             *grad_out.stride(), *dq.stride(),
             hq, hkv, nq, nk, p_len, **opts,
             PREFIX_MODE=mode, CAUSAL=bool(causal), HAS_WINDOW=window > 0,
             HAS_KPM=kpm is not None, **flags)

    if (need_dk or need_dv) and nk > 0:
        like = dk if need_dk else dv
        _run("dkdv", _bwd_dkdv_kernel, lambda c: (triton.cdiv(nk, c.block_n) * b * hkv,), tune_key,
             q.dtype, bd, dev,
             q, k, v, kpm_t, bias, grad_out, lse, delta,
             dk if need_dk else dummy, dv if need_dv else dummy,
             *q.stride(), *k.stride(), *v.stride(), *strides(kpm, 2), *s_bias,
             *grad_out.stride(), *like.stride(),
             hq, hkv, nq, nk, p_len, **opts,
             CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_KPM=kpm is not None,
             NEED_DK=need_dk, NEED_DV=need_dv, **flags)
    elif need_dk or need_dv:  # Nk == 0: empty gradients, nothing to write
        dk.zero_()
        dv.zero_()

    if need_dpk or need_dpv:
        t = prefix_k.shape[0]
        rows = row_start = dummy
        if mode == 3:
            rows, row_start = _bank_rows(prefix_index, t)
        nsplit = _prefix_split(triton.cdiv(p_len, 64) * t * hkv, nq, dev)
        if nsplit > 1:  # float32 partials (NSPLIT, T, Hkv, P, D), summed below in a fixed order
            gk = torch.empty((nsplit,) + tuple(prefix_k.shape), dtype=torch.float32, device=dev)
            gv = torch.empty_like(gk)
            s_g = gk.stride()
        else:
            gk, gv = (dpk if need_dpk else dummy), (dpv if need_dpv else dummy)
            s_g = (0,) + tuple((dpk if need_dpk else dpv).stride())
        _run("dprefix", _bwd_dprefix_kernel,
             lambda c: (triton.cdiv(p_len, c.block_n) * t * hkv, nsplit), tune_key + (mode, nsplit),
             q.dtype, bd, dev,
             q, grad_out, lse, delta, prefix_k, prefix_v, bias, rows, row_start, gk, gv,
             *q.stride(), *grad_out.stride(), *prefix_k.stride(), *prefix_v.stride(), *s_bias,
             *s_g, b, hq, hkv, nq, p_len, p_len + nk,
             opts["scale"], opts["softcap"], opts["dropout_p"], seed,
             PREFIX_MODE=mode, NEED_DK=need_dpk, NEED_DV=need_dpv, NSPLIT=nsplit, **flags)
        if nsplit > 1:
            if need_dpk:
                dpk.copy_(gk.sum(0))
            if need_dpv:
                dpv.copy_(gv.sum(0))
    return dq, dk, dv, dpk, dpv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/triton_aot.py): every configuration ``candidates`` may pick,
# with the heaviest feature set (bank prefix, causal, window, padding, bias, softcap, dropout,
# all gradients).
# ----------------------------------------------------------------------------------------------

_ALL_FEATURES = dict(PREFIX_MODE=3, CAUSAL=True, HAS_WINDOW=True, HAS_KPM=True,
                     HAS_BIAS=True, HAS_SOFTCAP=True, HAS_DROPOUT=True, NEED_DK=True,
                     NEED_DV=True, NSPLIT=1)
_LIGHT_FEATURES = dict(_ALL_FEATURES, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_DROPOUT=False)
# Unit strides the JIT specializes to 1 for contiguous inputs (head dim, mask and bias columns).
_UNIT_STRIDES = ("s_qd", "s_kd", "s_vd", "s_pkd", "s_pvd", "s_kpmn", "s_bn", "s_dod", "s_dqd",
                 "s_gd")
_FLOAT_ARGS = ("scale", "softcap", "dropout_p")
# Lengths the JIT sees divisible by 16 in a typical call (e.g. 2048); P, B and the head counts
# are left unmarked (any value).
_DIV16_INTS = ("Nq", "Nk", "row_len")
_POINTERS = {"q_ptr": "DT", "k_ptr": "DT", "v_ptr": "DT", "pk_ptr": "DT", "pv_ptr": "DT",
             "do_ptr": "DT", "dq_ptr": "DT", "dk_ptr": "DT", "dv_ptr": "DT", "dpk_ptr": "DT",
             "dpv_ptr": "DT", "pidx_ptr": "i64", "kpm_ptr": "u8", "bias_ptr": "fp32",
             "lse_ptr": "fp32", "delta_ptr": "fp32", "rows_ptr": "i32", "row_start_ptr": "i32"}


def _aot_variants(kernel, name: str, arch: int) -> list[dict]:
    out = []
    for dtype in configs.DTYPES:
        dt = SIG_DTYPE[dtype]
        ptrs = {a: "*" + (dt if t == "DT" else t) for a, t in _POINTERS.items()
                if a in kernel.arg_names}
        classes = (True,) if dtype == torch.float32 else (True, False)  # heavy / light tables
        for bd, heavy in [(bd, h) for bd in configs.HEAD_DIM_BUCKETS for h in classes]:
            for cfg in candidates(name, arch, dtype, bd, heavy):
                exact = dtype == torch.float32 and bd >= 128  # fp32_dots() on a GPU
                feats = _ALL_FEATURES if heavy else _LIGHT_FEATURES
                cx = dict(feats, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd,
                          D=bd, FP32_DOTS=exact, **{s: 1 for s in _UNIT_STRIDES})
                cx = {k: v for k, v in cx.items() if k in kernel.arg_names}
                sig = aot_signature(kernel, ptrs, _FLOAT_ARGS, cx)
                div16 = [a for a in sig if a in ptrs or a in _DIV16_INTS
                         or (a.startswith("s_") and sig[a] == "i32")]
                out.append({"label": f"{dt} d{bd} {'all-features' if heavy else 'light'}"
                                     + (" fp32-dots" if exact else ""), "heavy": heavy,
                            "config": str(cfg), "signature": sig, "constexprs": cx,
                            "div16": div16, "num_warps": cfg.num_warps,
                            "num_stages": cfg.num_stages, "tensor_cores": not exact,
                            "async_loads": cfg.num_stages > 1})
    return out


def _preprocess_variants(arch: int) -> list[dict]:
    out = []
    for dtype in configs.DTYPES:
        dt = SIG_DTYPE[dtype]
        ptrs = {"o_ptr": f"*{dt}", "do_ptr": f"*{dt}", "glse_ptr": "*fp32", "delta_ptr": "*fp32"}
        for bd in configs.HEAD_DIM_BUCKETS:
            cx = {"HAS_GLSE": True, "BLOCK_M": _preprocess_block_m(bd), "BLOCK_D": bd, "D": bd,
                  "s_od": 1, "s_dod": 1}
            sig = aot_signature(_bwd_preprocess_kernel, ptrs, (), cx)
            div16 = [a for a in sig if a in ptrs or (a.startswith("s_") and a != "s_gm")]
            out.append({"label": f"{dt} d{bd} grad_lse", "config": f"{cx['BLOCK_M']} rows w4 s1",
                        "signature": sig, "constexprs": cx, "div16": div16, "num_warps": 4,
                        "num_stages": 1, "tensor_cores": False})
    return out


AOT_SPECS = [
    {"name": "attention_bwd_preprocess", "kernel": _bwd_preprocess_kernel,
     "description": "delta = rowsum(dO * O) - grad_lse (backward)",
     "variants": _preprocess_variants},
    {"name": "attention_bwd_dq", "kernel": _bwd_dq_kernel,
     "description": "dQ over prefix + sequence keys (backward)",
     "products_per_tile": "3 (QK^T, dO V^T, dS K)",
     "variants": lambda arch: _aot_variants(_bwd_dq_kernel, "dq", arch)},
    {"name": "attention_bwd_dkdv", "kernel": _bwd_dkdv_kernel,
     "description": "dK/dV of the sequence keys, GQA heads reduced in-program (backward)",
     "products_per_tile": "4 (KQ^T, V dO^T, P^T dO, dS^T Q)",
     "variants": lambda arch: _aot_variants(_bwd_dkdv_kernel, "dkdv", arch)},
    {"name": "attention_bwd_dprefix", "kernel": _bwd_dprefix_kernel,
     "description": "dprefix_k/dprefix_v, contraction over all query rows (prompt-only backward)",
     "products_per_tile": "4 (KQ^T, V dO^T, P^T dO, dS^T Q)",
     "variants": lambda arch: _aot_variants(_bwd_dprefix_kernel, "dprefix", arch)},
]
