"""Triton backward of ``ptkernels::prefix_attention_bwd`` (the op conventions are in
``ptkernels/ops/prefix_attention.py``; the semantics are ``ptkernels.backends.eager``'s).

Kernels:

* ``_bwd_preprocess_kernel``: delta = rowsum(dO * O) - grad_lse, float32 (B, Hq, Nq).
* ``_bwd_dkdv_kernel``: grid (cdiv(Nk, BN) * B * Hkv,); a sequence key block loops over the G query
  heads of its KV head (GQA reduction in registers) and the query blocks that can see it.
* ``_bwd_dq_kernel``: grid (cdiv(Nq, BM) * B * Hq,); a query block loops over the prefix keys of
  its row's prefix, then (SEQ_KEYS) over the sequence key blocks it can see (causal/window block
  skipping).
* ``_bwd_dprefix_kernel`` + ``_sum_partials_kernel`` (``attention_bwd_prefix.py``): dprefix_k /
  dprefix_v; the prefix kernel computes its own delta, writes float32 partials per (batch row,
  query chunk), and the sum kernel adds them per prefix in a fixed order (deterministic).

Two paths for the sequence part of dQ (``uses_fused_dq``). Fused, the default for light calls
(no bias, softcap or dropout) and for dropout-only 16-bit calls at D <= 128 (``fused_tiles``)
that need dQ and dK: the dK/dV kernel also computes each tile
pair's dQ = dS K and adds it with float32 atomics to a (B, Hq, Nq, D) accumulator, and the dQ
kernel then runs over the prefix keys only and adds the accumulator before its single store
(FlashAttention-2's structure: S and dP are computed once per tile pair, 5 products instead of
7). Separate (7 products, no atomics, bitwise reproducible): calls with a bias or softcap, and
dropout at larger head dims, whose tiles have no registers left for a dQ tile; partial gradient
requests; and any call when determinism is asked
for (``torch.use_deterministic_algorithms(True)`` or PTKERNELS_DETERMINISTIC=1).

Given the final lse and delta each segment's backward is independent, so the prompt-only
backward (only dprefix_k / dprefix_v requested: q, k, v frozen) launches just the prefix kernel
and its sum; the preprocess, dQ and dK/dV kernels, whose cost grows with Nq * Nk, never run. In
matrix products, per head, over the S visible sequence pairs and the R = Nq * P prefix pairs:
the fused backward costs 2 * D * (5 * S + 7 * R) FLOPs (dK/dV + dQ: 5 over S; dQ: 3 over R;
dprefix: 4 over R), the separate one 2 * D * 7 * (S + R), the prompt-only one 2 * D * 4 * R:
e.g. 4.6% of the fused cost for Nq = Nk = 2048 causal, P = 64.

Masks (``masks.py``): the dQ and dK/dV kernels skip the key or query blocks that causal /
window masking leaves empty. Light and dropout-only calls at head dims <= 64 without a window
also split the remaining loop in two (``peels_masks``): the interior tiles, visible from every
row, run without the (rows x keys) compares and selects, and only the causal diagonal band and
the tails are masked. Elsewhere every tile is masked: the second loop costs 40-60 registers,
which the D = 128 and heavy tiles do not have (the AOT compile). Exponentials are base 2 with
log2(e) folded into the scale.

Grids fold (batch, head) into axis 0 (no 65,535 limit on B * Hq). Configurations: one table per
kernel, arch (sm_80 / sm_90), dtype class and head-dim bucket (``candidates``); the first that
the GPU can hold runs (``_run``: deterministic, no timing); a fixed small one under the
interpreter. All are compiled ahead of time by tests/test_triton_aot.py (``AOT_SPECS``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ptkernels.backends.triton import configs
from ptkernels.backends.triton._common import (INTERPRET, LOG2E, SIG_DTYPE, aot_shape_variants,
                                              aot_signature, alloc, block_d, cast_rounded,
                                              fp32_dots_mode, launch_first_fitting, load_tile,
                                              log2_scores, mma, prefix_mode, prefix_of_row,
                                              round_to, score_grad, strides, table_arch_of)
from ptkernels.backends.triton.configs import Config
from ptkernels.backends.triton.attention_bwd_prefix import (_bwd_dprefix_kernel, _key_tile_grads,
                                                            _query_tiles, _sum_partials_kernel,
                                                            prefix_block)
from ptkernels.backends.triton.dropout import dropout_keep, seed_from_tensor
from ptkernels.backends.triton.masks import (interior_bounds, interior_query_start, mask_scores,
                                            query_bounds, sequence_bounds)


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
def _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, bias_base, kpm_base,
               s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, s_kpm,
               lo, hi, offs_m, row_ok, b, h, Hq, Nseg, D: tl.constexpr, diag_off,
               window, scale, softcap, dropout_p, seed, col0, MASKED: tl.constexpr,
               HAS_KPM: tl.constexpr, MASK_CAUSAL: tl.constexpr, MASK_WINDOW: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               FP32_DOTS: tl.constexpr):
    """dQ contribution of the key blocks starting in [lo, hi) (steps of BLOCK_N) of one segment
    (prefix: col0 = 0, sequence: col0 = P). q, do (BM, BLOCK_D) tiles; lse2 = lse * log2(e)
    (+inf on empty rows and rows past Nq: their probabilities are exactly 0), delta (BM,).
    MASKED: boundary blocks (the tail, the causal diagonal band or the window edge band,
    ``masks.py``), whose scores get the mask; without it interior ones (every key visible to
    every row), which skip it. Separate loops, not a branch in one: the branch (an scf.if
    around the mask) costs the pipelined tiles 40-50 registers and spills (the AOT check)."""
    DT: tl.constexpr = k_base.dtype.element_ty
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_seg = offs_n < Nseg
        nd = in_seg[:, None] & (offs_d[None, :] < D)
        k = load_tile(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, nd, FP32_DOTS)
        v = load_tile(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, nd, FP32_DOTS)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), FP32_DOTS)
        s, t = log2_scores(s, scale, softcap, HAS_SOFTCAP)  # base 2, as lse2
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn,
                           mask=row_ok[:, None] & in_seg[None, :], other=0.0).to(tl.float32)
            s = s + bias * LOG2E
        if HAS_KPM:  # every block: no bound expresses the padding
            keep_key = tl.load(kpm_base + offs_n * s_kpm, mask=in_seg, other=0) != 0
            s = tl.where(keep_key[None, :], s, float("-inf"))
        if MASKED:
            s = mask_scores(s, offs_n, in_seg, offs_m, diag_off, window, True, MASK_CAUSAL,
                            MASK_WINDOW, False)
        p = tl.exp2(s - lse2[:, None])
        dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), FP32_DOTS)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, b * Hq + h, offs_m, col0, n0, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = score_grad(p * (dp - delta[:, None]), t, scale, HAS_SOFTCAP)
        dq = mma(round_to(ds, DT, FP32_DOTS), k, dq, FP32_DOTS)
    return dq


@triton.jit
def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pidx_ptr, kpm_ptr, bias_ptr, do_ptr, lse_ptr,
        delta_ptr, dq_ptr, dqacc_ptr,
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
        SEQ_KEYS: tl.constexpr, DQ_ACC: tl.constexpr, PEEL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32_DOTS: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M) * B * Hq,). dq (B, Hq, Nq, D) in q's dtype.

    SEQ_KEYS: loop over the sequence keys too (the 7-product path); without it only the prefix
    keys (the fused path, whose dK/dV kernel added the sequence part). DQ_ACC: add the float32
    accumulator dqacc (B, Hq, Nq, D) contiguous, which the fused dK/dV kernel filled, before the
    single cast and store. PEEL (``peels_masks``): the sequence loop in two, the interior
    unmasked; else one loop, every block masked."""
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
    q, do, md, lse2 = _query_tiles(q_ptr + b64 * s_qb + h * s_qh, do_ptr + b64 * s_dob + h * s_doh,
                                   lse_ptr + (b64 * Hq + h) * Nq, s_qm, s_qd, s_dom, s_dod,
                                   offs_m, row_ok, offs_d, D, FP32_DOTS)
    delta = tl.load(delta_ptr + (b64 * Hq + h) * Nq + offs_m, mask=row_ok, other=0.0)
    bias_base = bias_ptr + b64 * s_bb + h * s_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if PREFIX_MODE != 0:
        t = prefix_of_row(pidx_ptr, b64, PREFIX_MODE)
        pk_base = pk_ptr + t * s_pkt + hk * s_pkh
        pv_base = pv_ptr + t * s_pvt + hk * s_pvh
        p_whole = (P // BLOCK_N) * BLOCK_N  # blocks past it hold the prefix tail
        dq = _dq_blocks(dq, q, do, lse2, delta, pk_base, pv_base, bias_base, kpm_ptr,
                        s_pkn, s_pkd, s_pvn, s_pvd, s_bm, s_bn, 0,
                        0, P, offs_m, row_ok, b, h, Hq, P, D, 0, 0,
                        scale, softcap, dropout_p, seed, 0, True,
                        False, False, False, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT,
                        BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)

    if SEQ_KEYS:
        # Sequence keys this query block can see (bottom-right causal j <= i + (Nk - Nq); window
        # (i + Nk - Nq) - j < window): blocks outside [n_lo, n_hi) are skipped; with PEEL (no
        # window) those below n_ihi are interior (unmasked).
        diag_off = Nk - Nq
        n_lo, n_hi = sequence_bounds(m0, Nk, diag_off, window, BLOCK_M, BLOCK_N, CAUSAL,
                                     HAS_WINDOW)
        k_base = k_ptr + b64 * s_kb + hk * s_kh
        v_base = v_ptr + b64 * s_vb + hk * s_vh
        sb_base = bias_base + P * s_bn
        kpm_base = kpm_ptr + b64 * s_kpmb
        if not PEEL:  # every block masked
            dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, sb_base, kpm_base,
                            s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, s_kpmn,
                            n_lo, n_hi, offs_m, row_ok, b, h, Hq, Nk, D, diag_off, window,
                            scale, softcap, dropout_p, seed, P, True,
                            HAS_KPM, CAUSAL, HAS_WINDOW, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT,
                            BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
        else:  # the interior, then the causal diagonal band and the tail
            n_ihi = interior_bounds(n_lo, n_hi, m0, Nk, diag_off, window, BLOCK_M, BLOCK_N,
                                    CAUSAL, False)[1]
            dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, sb_base, kpm_base,
                            s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, s_kpmn,
                            n_lo, n_ihi, offs_m, row_ok, b, h, Hq, Nk, D, diag_off, window,
                            scale, softcap, dropout_p, seed, P, False,
                            HAS_KPM, CAUSAL, HAS_WINDOW, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT,
                            BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
            dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, sb_base, kpm_base,
                            s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, s_kpmn,
                            n_ihi, n_hi, offs_m, row_ok, b, h, Hq, Nk, D, diag_off, window,
                            scale, softcap, dropout_p, seed, P, True,
                            HAS_KPM, CAUSAL, HAS_WINDOW, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT,
                            BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
    if DQ_ACC:  # loaded after the loop: the accumulator tile is not held through it
        dq += tl.load(dqacc_ptr + (b64 * Hq + h) * Nq * D
                      + (offs_m[:, None] * D + offs_d[None, :]), mask=md, other=0.0)
    tl.store(dq_ptr + b64 * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             cast_rounded(dq, dq_ptr.dtype.element_ty, FP32_DOTS), mask=md)


@triton.jit
def _key_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, dqacc_base,
                s_qm, s_qd, s_dom, s_dod, s_bm, s_bn,
                lo, hi, offs_n, col_ok, key_keep, b, h, Hq, Nq, D: tl.constexpr,
                diag_off, window, scale, softcap, dropout_p, seed, n0, col0,
                MASKED: tl.constexpr, HAS_KPM: tl.constexpr, MASK_CAUSAL: tl.constexpr,
                MASK_WINDOW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
                FUSE_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, FP32_DOTS: tl.constexpr):
    """dK/dV contributions of the query blocks starting in [lo, hi) (steps of BLOCK_M) of head
    (b, h) to one sequence key block (``_key_tile_grads`` after loading the query tiles, lse and
    delta); MASKED as in ``_dq_blocks``. FUSE_DQ: also each tile pair's dQ = dS K, added with
    float32 atomics to the (Nq, D) accumulator of the head at ``dqacc_base`` (the FA2 structure:
    5 products per tile pair instead of the 7 of separate dQ and dK/dV kernels, which both
    recompute S and dP)."""
    DT: tl.constexpr = q_base.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Nq
        q, do, md, lse2 = _query_tiles(q_base, do_base, lse_base, s_qm, s_qd, s_dom, s_dod,
                                       offs_m, row_ok, offs_d, D, FP32_DOTS)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dk, dv, ds = _key_tile_grads(dk, dv, k, v, q, do, lse2, delta, bias_base, s_bm, s_bn,
                                     offs_m, row_ok, offs_n, col_ok, key_keep, b, h, Hq,
                                     diag_off, window, scale, softcap, dropout_p, seed, n0, col0,
                                     MASKED, HAS_KPM, MASK_CAUSAL, MASK_WINDOW, HAS_BIAS,
                                     HAS_SOFTCAP, HAS_DROPOUT, NEED_DK, NEED_DV, DT, BLOCK_M,
                                     BLOCK_N, FP32_DOTS)
        if FUSE_DQ:
            # In-head offsets fit int32 (the host fuses only when Nq * D < 2^31); relaxed
            # atomics: only the final sum is read, by the next kernel.
            dq = mma(tl.trans(round_to(ds, DT, FP32_DOTS)), k,
                     tl.zeros([BLOCK_M, BLOCK_D], tl.float32), FP32_DOTS)
            tl.atomic_add(dqacc_base + (offs_m[:, None] * D + offs_d[None, :]), dq, mask=md,
                          sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, kpm_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        dqacc_ptr,
        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
        s_kpmb, s_kpmn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod,
        s_gb, s_gh, s_gn, s_gd,  # dk and dv: same (contiguous) layout
        Hq, Hkv, Nq, Nk, P, window, scale, softcap, dropout_p, seed,
        D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, FUSE_DQ: tl.constexpr, PEEL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32_DOTS: tl.constexpr):
    """Grid (cdiv(Nk, BLOCK_N) * B * Hkv,). dk, dv (B, Hkv, Nk, D) in k's / v's dtype; with
    FUSE_DQ (needs NEED_DK) also the sequence keys' dQ into dqacc (B, Hq, Nq, D) float32,
    zero-filled by the host. PEEL as in ``_bwd_dq_kernel``."""
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
    key_keep = in_seg  # unused without a key padding mask
    if HAS_KPM:
        key_keep = tl.load(kpm_ptr + b64 * s_kpmb + offs_n * s_kpmn, mask=in_seg, other=0) != 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Queries that can see this key block (causal i >= j - (Nk - Nq); window
    # i < j + window - (Nk - Nq)): query blocks outside [m_lo, m_hi) are skipped; with PEEL (no
    # window) those from m_ilo on are interior (unmasked).
    diag_off = Nk - Nq
    m_lo, m_hi = query_bounds(n0, Nq, diag_off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    m_ilo = interior_query_start(m_lo, m_hi, n0, Nk, diag_off, BLOCK_M, BLOCK_N, CAUSAL)
    for g in range(0, G):
        h = hk * G + g
        q_base = q_ptr + b64 * s_qb + h * s_qh
        do_base = do_ptr + b64 * s_dob + h * s_doh
        lse_base = lse_ptr + (b64 * Hq + h) * Nq
        delta_base = delta_ptr + (b64 * Hq + h) * Nq
        bias_base = bias_ptr + b64 * s_bb + h * s_bh + P * s_bn
        dqacc_base = dqacc_ptr + (b64 * Hq + h) * Nq * D
        if not PEEL:  # every block masked
            dk, dv = _key_blocks(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, dqacc_base,
                s_qm, s_qd, s_dom, s_dod, s_bm, s_bn,
                m_lo, m_hi, offs_n, in_seg, key_keep, b, h, Hq, Nq, D,
                diag_off, window, scale, softcap, dropout_p, seed, n0, P, True,
                HAS_KPM, CAUSAL, HAS_WINDOW, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, NEED_DK, NEED_DV,
                FUSE_DQ, BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
        else:  # the causal diagonal band (all of a tail key block's), then the interior
            dk, dv = _key_blocks(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, dqacc_base,
                s_qm, s_qd, s_dom, s_dod, s_bm, s_bn,
                m_lo, m_ilo, offs_n, in_seg, key_keep, b, h, Hq, Nq, D,
                diag_off, window, scale, softcap, dropout_p, seed, n0, P, True,
                HAS_KPM, CAUSAL, HAS_WINDOW, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, NEED_DK, NEED_DV,
                FUSE_DQ, BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
            dk, dv = _key_blocks(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, dqacc_base,
                s_qm, s_qd, s_dom, s_dod, s_bm, s_bn,
                m_ilo, m_hi, offs_n, in_seg, key_keep, b, h, Hq, Nq, D,
                diag_off, window, scale, softcap, dropout_p, seed, n0, P, False,
                HAS_KPM, CAUSAL, HAS_WINDOW, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, NEED_DK, NEED_DV,
                FUSE_DQ, BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
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
# "16bit_heavy" serves calls with an attention bias or soft-capping, "16bit_dropout" those with
# dropout alone and "16bit" the others (light: no bias tile, tanh or Philox state, so larger
# pipelined tiles fit; ``table_class``); fp32 tiles serve all. Every entry compiles for its arch
# with its table's feature set and no register spills (AOT_SPECS below, tests/test_triton_aot.py), which is what keeps the heavy
# tiles small: dK/dV programs hold K, V and two float32 (BLOCK_N, D) accumulators for their whole
# life, and 3xTF32 (float32 inputs) needs split operands. float32 with D >= 128 runs with
# FP32_DOTS (exact fp32 FMA dots, no tensor cores: every tf32x3 dQ tile spilled on sm_90 there).
_C = Config
# (dK/dV at D = 64 and sm_90's dQ run 8 warps: with 4 the dropout mask's layout change,
# dropout.py, spills 4 B)
_FP32 = {
    "dq": {64: [_C(32, 32, 4, 2)], 128: [_C(16, 16, 8, 1)], 256: [_C(16, 16, 8, 1)]},
    "dkdv": {64: [_C(16, 32, 8, 1)], 128: [_C(16, 16, 8, 1)], 256: [_C(16, 16, 8, 1)]},
    "dkdv_dq": {64: [_C(16, 32, 4, 1)], 128: [_C(16, 16, 8, 1)], 256: [_C(16, 16, 8, 1)]},
    "dq_prefix": {64: [_C(32, 32, 4, 2)], 128: [_C(16, 16, 8, 1)], 256: [_C(16, 16, 8, 1)]},
}
_FP32_90 = dict(_FP32, dq={**_FP32["dq"], 64: [_C(32, 32, 8, 2)]})
# D = 256 runs 8 warps: with 4, the dropout mask's layout change (dropout.py) pushes dK/dV 16x32
# into 60-96 B of spills and sm_90's dQ 32x32 into 36 B. sm_80 / sm_86 dQ at D = 128: 32x32 w8
# (158 registers, 183 at D = 80); 64x32 w8 s2 spills 68 B at D = 80 with odd lengths and MHA
# heads (tests/test_triton_aot.py's shape variants), 64x32 w4 40-92 B.
_HEAVY = {
    "dq": {64: [_C(64, 32, 4, 2), _C(128, 32, 8, 2)], 128: [_C(32, 32, 8, 2), _C(32, 32, 4, 2)],
           256: [_C(32, 32, 8, 1)]},
    "dkdv": {64: [_C(16, 64, 4, 1)], 128: [_C(16, 64, 8, 1)], 256: [_C(16, 32, 8, 1)]},
}
# (sm_90 dq at D = 128 used to run 64x32 with 4 warps: with D = 80, odd lengths and MHA heads
# it spills 24 B there; 8 warps do not)
_HEAVY_90 = dict(_HEAVY, dq={**_HEAVY["dq"], 128: [_C(64, 32, 8, 2), _C(32, 32, 4, 2)]},
                 dkdv={**_HEAVY["dkdv"], 64: [_C(16, 64, 4, 1), _C(32, 64, 4, 1)]})
# Light calls: pipelined (3-stage, cp.async) tiles. sm_90 holds 32x128 dK/dV tiles (wgmma reads
# its operands from shared memory); on sm_80 / sm_86 they spill, 32x64 with 8 warps does not.
_LIGHT = {
    "dq": {64: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)], 128: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)],
           256: [_C(32, 32, 4, 1)]},
    "dkdv": {64: [_C(32, 64, 8, 3), _C(16, 64, 4, 1)], 128: [_C(32, 64, 8, 3), _C(16, 64, 8, 1)],
             256: [_C(16, 32, 4, 1)]},
    # The fused backward (light calls, and dropout-only ones up to D = 128: ``fused_tiles``):
    # dK/dV programs that also hold a (BLOCK_M, D) float32 dQ tile per step, and the prefix-keys
    # dQ kernel that adds their sum.
    # Per step a program loads Q and dO (4 * BLOCK_M * D bytes) and adds BLOCK_M * D float32
    # atomics for 10 * BLOCK_M * BLOCK_N * D FLOPs: traffic per FLOP falls with BLOCK_N only, so
    # the widest key block that compiles spill-free comes first (d64: 32x128 w8 s2, 254
    # registers with the peeled loop, ``peels_masks``; 64x64 w8 s3 spills 84 B and, peeled,
    # 32x64 w8 s3 64 B; d128: 32x128 spills 208 B on sm_80, 32x64 does not).
    "dkdv_dq": {64: [_C(32, 128, 8, 2), _C(16, 64, 4, 1)],
                128: [_C(32, 64, 8, 3), _C(16, 64, 8, 1)],
                256: [_C(16, 32, 8, 1), _C(16, 16, 4, 1), _C(16, 16, 8, 1)]},
    "dq_prefix": {64: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)],
                  128: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)], 256: [_C(32, 32, 4, 1)]},
}
_LIGHT_90 = dict(_LIGHT, dkdv={**_LIGHT["dkdv"], 64: [_C(32, 128, 8, 3), _C(16, 64, 4, 1)],
                               128: [_C(32, 128, 8, 3), _C(16, 64, 8, 1)]},
                 # sm_90: 32x128 w8, 3 stages at d64 (210 registers), 2 at d128 (248; 3 stages
                 # spill 8 B at D = 80 with odd lengths)
                 dkdv_dq={64: [_C(32, 128, 8, 3), _C(32, 64, 8, 3), _C(16, 64, 4, 1)],
                          128: [_C(32, 128, 8, 2), _C(32, 64, 8, 3), _C(16, 64, 8, 1)],
                          256: [_C(16, 32, 8, 1), _C(16, 16, 8, 1)]})
# Prefix gradients (attention_bwd_prefix.py): Config(query rows per step, BLOCK_P = prefix rows
# held, warps, stages); ``candidates(..., block_p=)`` keeps those of one BLOCK_P, and the call's
# BLOCK_P is the smallest of the list that holds the whole prefix, else the largest (the prefix
# is then split over blocks that each re-read the query rows; ``prefix_block``). The program
# keeps two float32 (BLOCK_P, D) accumulators, the score tiles and the Q / dO / O tiles live at
# once, so the query step shrinks as BLOCK_P * D grows: 128 rows a step fit with 16 prefix rows
# at D = 64, 16 with 128 prefix rows at D = 128; larger pairs spill (measured with the AOT
# compile). The kernel is memory-bound at every entry (per query row it reads Q, O and dO, 6 * D
# bytes, for 8 * BLOCK_P * D FLOPs), so a prefix of 17 padded to 64 rows costs tensor-core time
# that the loads hide. Every entry fits sm_86's 99 KB. On sm_80 / sm_86 the heavy 64- and
# 128-row prefix blocks at D = 64 run unpipelined: with 2 stages they spill 48-52 B (222 and 243
# registers with 1); so does float32's 32x16 with 4 warps (16 B).
_PREFIX = {
    "16bit": {64: [_C(128, 16, 8, 2), _C(32, 64, 4, 3), _C(32, 128, 8, 3)],
              128: [_C(64, 16, 8, 2), _C(32, 64, 8, 2), _C(16, 128, 8, 2)],
              256: [_C(32, 16, 8, 2), _C(32, 32, 8, 2)]},
    "16bit_heavy": {64: [_C(128, 16, 8, 2), _C(16, 64, 8, 2), _C(16, 128, 8, 2)],
                    128: [_C(64, 16, 8, 2), _C(32, 32, 8, 2)],
                    256: [_C(32, 16, 8, 2), _C(16, 32, 8, 2)]},
    "fp32": {64: [_C(32, 16, 4, 2), _C(16, 32, 8, 2)],
             128: [_C(32, 16, 8, 1), _C(16, 32, 8, 1)],
             256: [_C(16, 16, 8, 1)]},
}
_PREFIX_80 = {**_PREFIX, "16bit_heavy": {**_PREFIX["16bit_heavy"],
                                          64: [_C(128, 16, 8, 2), _C(16, 64, 8, 1),
                                               _C(16, 128, 8, 1)]},
              # float32 at D = 64: 32x16 w4 s2 spills 16 B there, 8 warps do not
              "fp32": {**_PREFIX["fp32"], 64: [_C(32, 16, 8, 2), _C(16, 32, 8, 2)]}}


# Dropout-only calls ("16bit_dropout"): the Philox mask without a bias tile or the tanh
# derivative leaves room for pipelined tiles near the light ones (AOT compile, with every other
# feature and all gradients on). sm_80 / sm_86: dQ 128x32 w8 s3 at D = 64 (255 registers) but
# 64x32 at D = 128 (128x32 spills 32-40 B); dK/dV 16x64 w8 s3 at D = 64 (32x64 spills 88 B)
# and 32x64 w8 s3 at D = 128 (244). sm_90: dQ 128x32 w8 s3 (164 / 228); dK/dV 32x128 w8 s3 at
# D = 64 (228), 32x64 w8 s2 at D = 128 (3 stages spill 8 B at D = 80 with odd lengths and MHA
# heads without a window, the compile that most calls run; 32x128 spills 24-36 B). D = 256 as
# heavy calls.
# The dQ and dK/dV lists end with their heavy table's first tiles (sm_80 / sm_86 dQ at D = 64
# with 8 warps instead of 4, which spill 4 B with the peeled loop, ``peels_masks``). The fused
# 5-product kernels (dkdv_dq + dq_prefix) serve dropout-only calls up to D = 128, where a
# pipelined dK/dV tile still holds the dQ tile spill-free: D = 64 sm_90 32x128 w8 s3, sm_80
# 16x64 w8 s3; D = 128 sm_80 / sm_86 32x64 w8 s2 (254 registers; 3 stages spill 24-40 B),
# sm_90 16x64 w8 s3 (244; 16x128 w8 s2 spills 20 B at D = 96 with MQA heads, 32x64 4-16 B).
# Fused, the Philox mask and the probabilities are computed once per tile pair instead of once
# in each of the dQ and dK/dV kernels, and 5 products replace 7, for BLOCK_M x D float32 dQ
# atomics per step. At D = 256 dropout calls keep the separate kernels (``fused_tiles``).
_DROPOUT = {
    "dkdv_dq": {64: [_C(16, 64, 8, 3), _C(16, 64, 4, 1)],
                128: [_C(32, 64, 8, 2), _C(16, 64, 8, 3), _C(16, 64, 8, 1)]},
    "dq_prefix": {64: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)],
                  128: [_C(64, 32, 8, 3), _C(32, 32, 8, 2)]},
    "dq": {64: [_C(128, 32, 8, 3), _C(64, 32, 8, 2)], 128: [_C(64, 32, 8, 3), _C(32, 32, 8, 2)],
           256: [_C(32, 32, 8, 1)]},
    "dkdv": {64: [_C(16, 64, 8, 3), _C(16, 64, 4, 1)], 128: [_C(32, 64, 8, 3), _C(16, 64, 8, 1)],
             256: [_C(16, 32, 8, 1)]},
}
_DROPOUT_90 = {
    "dkdv_dq": {64: [_C(32, 128, 8, 3), _C(32, 64, 8, 3), _C(16, 64, 4, 1)],
                128: [_C(16, 64, 8, 3), _C(16, 64, 8, 1)]},
    "dq_prefix": {64: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)],
                  128: [_C(128, 32, 8, 3), _C(64, 32, 8, 2)]},
    "dq": {64: [_C(128, 32, 8, 3), _C(64, 32, 4, 2)], 128: [_C(128, 32, 8, 3), _C(64, 32, 8, 2)],
           256: [_C(32, 32, 8, 1)]},
    "dkdv": {64: [_C(32, 128, 8, 3), _C(16, 64, 4, 1)], 128: [_C(32, 64, 8, 2), _C(16, 64, 8, 1)],
             256: [_C(16, 32, 8, 1)]},
}
# Prefix gradients of dropout-only calls: one configuration per prefix block, as the light and
# heavy tables (sm_80 / sm_86 at D = 64: 16-row steps, 32x64 and 32x128 spill 136-164 B there).
_PREFIX["16bit_dropout"] = {64: [_C(128, 16, 8, 2), _C(32, 64, 4, 3), _C(32, 128, 8, 3)],
                            128: [_C(64, 16, 8, 2), _C(32, 64, 8, 2), _C(16, 128, 8, 1)],
                            256: [_C(32, 16, 8, 2), _C(32, 32, 8, 2)]}
_PREFIX_80["16bit_dropout"] = {**_PREFIX["16bit_dropout"],
                               64: [_C(128, 16, 8, 2), _C(16, 64, 8, 3), _C(16, 128, 8, 2)]}


def _tables(light, heavy, fp32, prefix=_PREFIX, dropout=None):
    # the fused kernels ("dkdv_dq", "dq_prefix") serve light and dropout calls: no heavy table; a
    # kernel without a "16bit_dropout" table runs dropout-only calls with its heavy one
    out = {k: {"16bit": light[k], "16bit_heavy": heavy.get(k, {}), "fp32": fp32[k]}
           for k in light}
    for k, table in (dropout or {}).items():
        out[k]["16bit_dropout"] = table
    return dict(out, dprefix=prefix)


_BWD = {80: _tables(_LIGHT, _HEAVY, _FP32, _PREFIX_80, _DROPOUT),
        86: _tables(_LIGHT, _HEAVY, _FP32, _PREFIX_80, _DROPOUT),
        90: _tables(_LIGHT_90, _HEAVY_90, _FP32_90, _PREFIX, _DROPOUT_90)}
# The interpreter: one fixed small configuration (tests may change it to exercise more tiles).
INTERPRET_CONFIG = Config(32, 32, 4, 1)


def fp32_dots(dtype: torch.dtype, block_d: int) -> int:
    """The FP32_DOTS mode (``_common.mma``): float32 with D >= 128 multiplies exactly on the GPU
    (every tf32x3 dQ tile spilled on sm_90 there)."""
    return fp32_dots_mode(dtype, exact_on_gpu=dtype == torch.float32 and block_d >= 128)


# The backward's table classes: "light" (no bias, soft-capping or dropout), "dropout" (dropout
# only: the Philox mask costs far fewer registers than a bias tile or the tanh derivative) and
# "heavy" (bias or soft-capping, with or without the others).
CLASSES = ("light", "dropout", "heavy")
_CLASS_KEY = {"light": "16bit", "dropout": "16bit_dropout", "heavy": "16bit_heavy"}
# The feature set each class's configurations are compiled with (AOT_SPECS).
CLASS_FEATURES = {"light": (), "dropout": ("HAS_DROPOUT",),
                  "heavy": ("HAS_BIAS", "HAS_SOFTCAP", "HAS_DROPOUT")}


def table_class(flags: dict) -> str:
    """The table class of a call's feature flags (HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT)."""
    if flags["HAS_BIAS"] or flags["HAS_SOFTCAP"]:
        return "heavy"
    return "dropout" if flags["HAS_DROPOUT"] else "light"


def candidates(kernel: str, arch: int, dtype: torch.dtype, block_d: int,
               features: str = "heavy", block_p: int | None = None) -> list[Config]:
    """Every configuration the backward may run ``kernel`` ("dq", "dkdv", "dkdv_dq", "dq_prefix",
    "dprefix") with, best first (none for a fused kernel and a dropout or heavy call);
    ``features`` = the call's ``table_class``; ``block_p`` (dprefix only) keeps the
    configurations of that prefix block (all when None)."""
    if features not in _CLASS_KEY:
        raise ValueError(f"features must be one of {CLASSES}, got {features!r}")
    table = _BWD[configs.table_arch(arch)][kernel]
    bucket = next(ub for ub in configs.HEAD_DIM_BUCKETS if block_d <= ub)
    cls = "fp32" if dtype == torch.float32 else _CLASS_KEY[features]
    entries = table.get(cls, table["16bit_heavy"])
    return [c for c in entries.get(bucket, []) if block_p is None or c.block_n == block_p]


_CHOSEN: dict = {}


def _preprocess_block_m(bd: int) -> int:
    """Rows per preprocess program: two (BLOCK_M, BLOCK_D) fp32 tiles stay at 64 registers a
    thread with 4 warps."""
    return max(16, 4096 // bd)


def _launch(name: str, kernel, grid, *args, **kwargs):
    """The single launch point of this module (tests spy on it to count launches per kernel)."""
    kernel[grid](*args, **kwargs)


def _run(name: str, kernel, grid_fn, key: tuple, dtype, block_d: int, device, *args,
         block_p: int | None = None, **kwargs):
    """Launch ``kernel`` with the configuration for this call: fixed under the interpreter, else
    the first candidate the GPU can hold (``launch_first_fitting``: deterministic, no timing).
    ``block_p``: the prefix kernel's BLOCK_P (its configurations' block_n)."""
    n_name = "BLOCK_N" if block_p is None else "BLOCK_P"

    def run(cfg):
        _launch(name, kernel, grid_fn(cfg), *args, **kwargs, BLOCK_M=cfg.block_m,
                **{n_name: cfg.block_n}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if INTERPRET or device.type != "cuda":
        cfg = INTERPRET_CONFIG
        return run(cfg if block_p is None else cfg._replace(block_n=block_p))
    arch = table_arch_of(device)
    launch_first_fitting(_CHOSEN, (name, arch, dtype, block_d, block_p) + key,
                         candidates(name, arch, dtype, block_d, table_class(kwargs), block_p),
                         run)


# Query rows per chunk of the prefix kernel are a multiple of this (a multiple of every BLOCK_M
# of its table, so the chunking does not depend on the configuration).
CHUNK_ROWS = 128


def _prefix_chunks(programs: int, nq: int, device) -> tuple[int, int]:
    """(NCHUNK, rows per chunk): the query rows of each (batch row, KV head, prefix block) are
    split into NCHUNK chunks so that the prefix kernel has about two programs per SM (a shared
    prefix with a small batch still fills the GPU). Under the interpreter: at most 2 chunks of
    INTERPRET_CONFIG.block_m rows (the chunked path runs in every test)."""
    if INTERPRET or device.type != "cuda":
        unit, want = INTERPRET_CONFIG.block_m, 2
    else:
        unit = CHUNK_ROWS
        want = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count,
                           max(programs, 1))
    n_units = triton.cdiv(nq, unit)
    rows = triton.cdiv(n_units, max(1, min(want, n_units))) * unit
    return triton.cdiv(nq, rows), rows


def _bank_rows(prefix_index: torch.Tensor, t: int):
    """The batch rows of each bank prefix, sorted by prefix (int32 (B,)), and where prefix t's
    rows start (int32 (T + 1,)). Device-side only (no ``bincount``, whose output size needs a
    host synchronization): row_start[t] = number of rows with a prefix < t."""
    rows = torch.argsort(prefix_index, stable=True)
    sorted_index = prefix_index[rows]
    bounds = torch.arange(t + 1, device=prefix_index.device, dtype=sorted_index.dtype)
    row_start = torch.searchsorted(sorted_index, bounds).to(torch.int32)
    return rows.to(torch.int32), row_start


def _prefix_grads(grad_out, grad_lse, q, out, lse, prefix_k, prefix_v, prefix_index, bias,
                  s_bias, mode, seed, opts, flags, tune_key, need_dpk, need_dpv, dpk,
                  dpv):
    """dprefix_k / dprefix_v (T, Hkv, P, D) into ``dpk`` / ``dpv`` (contiguous): the prefix
    kernel's float32 partials (B, NCHUNK, Hkv, P, D), then their fixed-order sum per prefix
    (attention_bwd_prefix.py)."""
    b, hq, nq, d = q.shape
    t, hkv, p_len = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    dev, bd = q.device, flags["BLOCK_D"]
    arch = table_arch_of(dev)
    bp = prefix_block(p_len, [c.block_n for c in candidates("dprefix", arch, q.dtype, bd,
                                                             table_class(flags))])
    n_pb = triton.cdiv(p_len, bp)
    n_chunk, chunk_rows = _prefix_chunks(n_pb * b * hkv, nq, dev)
    ws_shape = (b, n_chunk, hkv, p_len, d)
    wk = torch.empty(ws_shape, dtype=torch.float32, device=dev) if need_dpk else q
    wv = torch.empty(ws_shape, dtype=torch.float32, device=dev) if need_dpv else q
    _run("dprefix", _bwd_dprefix_kernel, lambda c: (n_pb * n_chunk * b * hkv,),
         tune_key + (mode,), q.dtype, bd, dev,
         q, grad_out, out, lse, grad_lse if grad_lse is not None else q, prefix_k, prefix_v,
         prefix_index if mode == 3 else q, bias, wk, wv,
         *q.stride(), *grad_out.stride(), *out.stride(), *strides(grad_lse, 3),
         *prefix_k.stride(), *prefix_v.stride(), *s_bias,
         hq, hkv, nq, p_len, chunk_rows, n_chunk,
         opts["scale"], opts["softcap"], opts["dropout_p"], seed,
         block_p=bp, PREFIX_MODE=mode, HAS_GLSE=grad_lse is not None,
         NEED_DK=need_dpk, NEED_DV=need_dpv, **flags)
    rows = row_start = q
    if mode == 3:
        rows, row_start = _bank_rows(prefix_index, t)
    block = 1024
    _launch("dprefix_sum", _sum_partials_kernel, (triton.cdiv(p_len * d, block), t * hkv),
            wk, wv, rows, row_start, dpk if need_dpk else q, dpv if need_dpv else q,
            b, hkv, p_len * d, n_chunk, PREFIX_MODE=mode, NEED_DK=need_dpk, NEED_DV=need_dpv,
            BLOCK=block, FP32_DOTS=INTERPRET, num_warps=4)


def deterministic_requested() -> bool:
    """``torch.use_deterministic_algorithms(True)`` or PTKERNELS_DETERMINISTIC=1: the backward
    then avoids the float32 atomics of the fused dQ (bitwise-reproducible gradients)."""
    return torch.are_deterministic_algorithms_enabled() or \
        os.environ.get("PTKERNELS_DETERMINISTIC", "0") == "1"


def fused_tiles(features: str, arch: int, dtype: torch.dtype, block_d: int) -> bool:
    """Whether the fused dK/dV + dQ kernel has spill-free configurations for a call of table
    class ``features``: every light call; dropout-only calls in 16-bit at the head dims their
    table covers (D <= 128); never bias or softcap (no registers left for a dQ tile)."""
    if features == "light":
        return True
    if features != "dropout" or dtype == torch.float32:
        return False
    return bool(candidates("dkdv_dq", arch, dtype, block_d, features))


def uses_fused_dq(need_dq: bool, need_dk: bool, fusable: bool, nk: int, head_elems: int) -> bool:
    """Whether the sequence keys' dQ is fused into the dK/dV kernel (5 products per tile pair,
    dQ added with float32 atomics) rather than computed by the dQ kernel (7 products between the
    two, no atomics). Fused: calls whose class has fused tiles (``fusable``: ``fused_tiles``) that
    need both dQ and dK, with sequence keys, an accumulator whose in-head offsets fit int32
    (``head_elems`` = Nq * D < 2^31), and no determinism asked for
    (``deterministic_requested``)."""
    return (need_dq and need_dk and fusable and nk > 0 and head_elems < 2 ** 31
            and not deterministic_requested())


def peels_masks(features: str, block_d: int, has_window: bool) -> bool:
    """Whether the dQ and dK/dV kernels split their sequence loop in an unmasked interior and a
    masked band (causal diagonal, tails; ``masks.py``), FlashAttention-2's peeling, instead of
    masking every block: light and dropout-only calls at head dims <= 64, without a window.

    Measured with the AOT compile (tests/test_triton_aot.py), not guessed: a second pipelined
    loop costs the tiles 40-60 registers. At BLOCK_D = 64 the light and dropout tiles absorb it
    (sm_90 dK/dV 32x128 w8 s3: 214 registers peeled; sm_80 dQ 128x32 w8 s3: 182); at 128 every
    pipelined dQ / dK/dV tile of sm_80 and the dK/dV tiles of sm_90 then spill (12-128 B), and
    so do the heavy tiles (bias, soft-capping) at 64. A branch around the mask inside one loop
    instead of a second loop costs as much (dQ 128x32 at D = 128: 96 B of spills). With a
    window the edge band would need a third loop: every block stays masked."""
    return features != "heavy" and block_d <= 64 and not has_window


def backward_path() -> str:
    """What a light full backward runs now (``ptkernels info``)."""
    if deterministic_requested():
        return "7-product (separate dQ and dK/dV kernels, deterministic)"
    return "5-product (dQ fused into dK/dV, float32 atomics; deterministic on request)"


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

    if need_dq or need_dk or need_dv:  # the prefix kernel computes its own delta
        delta = torch.empty((b, hq, nq), dtype=torch.float32, device=dev)
        pre_m = _preprocess_block_m(bd)
        _launch("preprocess", _bwd_preprocess_kernel, (triton.cdiv(nq, pre_m) * b * hq,),
                out, grad_out, grad_lse if grad_lse is not None else dummy, delta,
                *out.stride(), *grad_out.stride(), *strides(grad_lse, 3), hq, nq, D=d,
                HAS_GLSE=grad_lse is not None, BLOCK_M=pre_m, BLOCK_D=bd, num_warps=4)

    bias = attn_bias if attn_bias is not None else dummy
    s_bias = strides(attn_bias, 4)
    kpm_t = kpm if kpm is not None else dummy

    prefix_args = (prefix_k if has_prefix else dummy, prefix_v if has_prefix else dummy,
                   prefix_index if mode == 3 else dummy)
    fusable = fused_tiles(table_class(flags), table_arch_of(dev), q.dtype, bd)
    fused = uses_fused_dq(need_dq, need_dk, fusable, nk, nq * d)
    dqacc = torch.zeros((b, hq, nq, d), dtype=torch.float32, device=dev) if fused else dummy
    peel = peels_masks(table_class(flags), bd, window > 0)

    def run_dq(name, seq_keys):
        _run(name, _bwd_dq_kernel, lambda c: (triton.cdiv(nq, c.block_m) * b * hq,),
             tune_key + (mode,), q.dtype, bd, dev,
             q, k, v, *prefix_args, kpm_t, bias, grad_out, lse, delta, dq, dqacc,
             *q.stride(), *k.stride(), *v.stride(), *strides(prefix_k if has_prefix else None, 4),
             *strides(prefix_v if has_prefix else None, 4), *strides(kpm, 2), *s_bias,
             *grad_out.stride(), *dq.stride(),
             hq, hkv, nq, nk, p_len, **opts,
             PREFIX_MODE=mode, CAUSAL=bool(causal), HAS_WINDOW=window > 0,
             HAS_KPM=kpm is not None, SEQ_KEYS=seq_keys, DQ_ACC=not seq_keys, PEEL=peel,
             **flags)

    if need_dq and not fused:
        run_dq("dq", seq_keys=True)

    if (need_dk or need_dv) and nk > 0:
        like = dk if need_dk else dv
        _run("dkdv_dq" if fused else "dkdv", _bwd_dkdv_kernel,
             lambda c: (triton.cdiv(nk, c.block_n) * b * hkv,), tune_key,
             q.dtype, bd, dev,
             q, k, v, kpm_t, bias, grad_out, lse, delta,
             dk if need_dk else dummy, dv if need_dv else dummy, dqacc,
             *q.stride(), *k.stride(), *v.stride(), *strides(kpm, 2), *s_bias,
             *grad_out.stride(), *like.stride(),
             hq, hkv, nq, nk, p_len, **opts,
             CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_KPM=kpm is not None,
             NEED_DK=need_dk, NEED_DV=need_dv, FUSE_DQ=fused, PEEL=peel, **flags)
    elif need_dk or need_dv:  # Nk == 0: empty gradients, nothing to write
        dk.zero_()
        dv.zero_()

    if fused:  # the prefix keys' dQ, plus the sequence part accumulated above: one cast, one store
        run_dq("dq_prefix", seq_keys=False)

    if need_dpk or need_dpv:
        _prefix_grads(grad_out, grad_lse, q, out, lse, prefix_k, prefix_v, prefix_index, bias,
                      s_bias, mode, seed, opts, flags, tune_key, need_dpk, need_dpv, dpk, dpv)
    return dq, dk, dv, dpk, dpv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/triton_aot.py): every configuration ``candidates`` may pick,
# with its table's feature set (bank prefix, causal, padding, all gradients, plus the class's
# bias / softcap / dropout), and again with a window for the kernels whose sequence loop it
# changes (a window masks every block; without one the loop is split in an unmasked interior
# and a masked band: different code, both compiled).
# ----------------------------------------------------------------------------------------------

_ALL_FEATURES = dict(PREFIX_MODE=3, CAUSAL=True, HAS_WINDOW=False, HAS_KPM=True,
                     HAS_BIAS=True, HAS_SOFTCAP=True, HAS_DROPOUT=True, NEED_DK=True,
                     NEED_DV=True, HAS_GLSE=True)
_LIGHT_FEATURES = dict(_ALL_FEATURES, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_DROPOUT=False)
# Unit strides the JIT specializes to 1 for contiguous inputs (head dim, mask and bias columns).
_UNIT_STRIDES = ("s_qd", "s_kd", "s_vd", "s_pkd", "s_pvd", "s_kpmn", "s_bn", "s_dod", "s_dqd",
                 "s_gd", "s_od", "s_gm")
_FLOAT_ARGS = ("scale", "softcap", "dropout_p")
# Lengths the JIT sees divisible by 16 in a typical call (e.g. 2048); P, B and the head counts
# are left unmarked (any value).
_DIV16_INTS = ("Nq", "Nk", "rows_per_chunk")
_POINTERS = {"q_ptr": "DT", "k_ptr": "DT", "v_ptr": "DT", "pk_ptr": "DT", "pv_ptr": "DT",
             "do_ptr": "DT", "dq_ptr": "DT", "dk_ptr": "DT", "dv_ptr": "DT", "dpk_ptr": "DT",
             "dpv_ptr": "DT", "pidx_ptr": "i64", "kpm_ptr": "u8", "bias_ptr": "fp32",
             "lse_ptr": "fp32", "delta_ptr": "fp32", "rows_ptr": "i32", "row_start_ptr": "i32",
             "o_ptr": "DT", "glse_ptr": "fp32", "wk_ptr": "fp32", "wv_ptr": "fp32",
             "dqacc_ptr": "fp32"}
# Per kernel table: its path's constexprs (the same kernels serve both backward paths).
_PATH_FEATURES = {"dq": dict(SEQ_KEYS=True, DQ_ACC=False), "dkdv": dict(FUSE_DQ=False),
                  "dkdv_dq": dict(FUSE_DQ=True), "dq_prefix": dict(SEQ_KEYS=False, DQ_ACC=True),
                  "dprefix": {}}
FUSED_KERNELS = ("dkdv_dq", "dq_prefix")  # light and dropout-only calls (``fused_tiles``)
WINDOW_KERNELS = ("dq", "dkdv", "dkdv_dq")  # the tables whose kernels loop over sequence keys


# fp16 and bf16 share the 16-bit tables and their code differs only in conversions: the 16-bit
# variants are compiled in bf16 (configs.aot_dtype), as the forward's.
_AOT_DTYPES = (torch.bfloat16, torch.float32)


def _aot_variants(kernel, name: str, arch: int) -> list[dict]:
    out = []
    for dtype in _AOT_DTYPES:
        dt = SIG_DTYPE[dtype]
        ptrs = {a: "*" + (dt if t == "DT" else t) for a, t in _POINTERS.items()
                if a in kernel.arg_names}
        # each class's table with its features (fp32: one table, compiled heavy unless the
        # kernel is light-only); a dropout config the heavy table also lists is covered by the
        # heavy compile (more registers, same tiles) unless only the dropout call peels its loop
        has_dropout = "16bit_dropout" in _BWD[configs.table_arch(arch)][name]
        if name in FUSED_KERNELS:
            classes = ("light",) + (("dropout",) if has_dropout and dtype != torch.float32 else ())
        elif dtype == torch.float32:
            classes = ("heavy",)
        else:
            classes = ("heavy", "light") + (("dropout",) if has_dropout else ())
        heavy_cfgs = set()
        for bd, cls in [(bd, c) for bd in configs.HEAD_DIM_BUCKETS for c in classes]:
            for cfg in candidates(name, arch, dtype, bd, cls):
                if cls == "heavy":
                    heavy_cfgs.add((bd, cfg))
                elif (cls == "dropout" and (bd, cfg) in heavy_cfgs
                      and peels_masks(cls, bd, False) == peels_masks("heavy", bd, False)):
                    continue  # the same loops: covered by the heavy compile
                exact = dtype == torch.float32 and bd >= 128  # fp32_dots() on a GPU
                feats = dict(_LIGHT_FEATURES, **{f: True for f in CLASS_FEATURES[cls]})
                cx = dict(feats, **_PATH_FEATURES[name], PEEL=peels_masks(cls, bd, False),
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_P=cfg.block_n, BLOCK_D=bd, D=bd, FP32_DOTS=exact,
                          **{s: 1 for s in _UNIT_STRIDES})
                cx = {k: v for k, v in cx.items() if k in kernel.arg_names}
                sig = aot_signature(kernel, ptrs, _FLOAT_ARGS, cx)
                div16 = [a for a in sig if a in ptrs or a in _DIV16_INTS
                         or (a.startswith("s_") and sig[a] == "i32")]
                label = {"heavy": "all-features"}.get(cls, cls)
                out.append({"label": f"{dt} d{bd} {label}" + (" fp32-dots" if exact else ""),
                            "features": cls,
                            "config": str(cfg), "signature": sig, "constexprs": cx,
                            "div16": div16, "num_warps": cfg.num_warps,
                            "num_stages": cfg.num_stages, "tensor_cores": not exact,
                            "async_loads": cfg.num_stages > 1})
                base = out[-1]
                if name in WINDOW_KERNELS:
                    out.append(dict(base, label=base["label"] + " window",
                                    constexprs=dict(base["constexprs"], HAS_WINDOW=True,
                                                    PEEL=peels_masks(cls, bd, True))))
                first = cfg == candidates(name, arch, dtype, bd, cls)[0]
                if (dt, bd) == ("bf16", 128) and first and configs.table_arch(arch) != 86:
                    out += aot_shape_variants(base)
    return out


def _preprocess_variants(arch: int) -> list[dict]:
    out = []
    for dtype in _AOT_DTYPES:
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


def _sum_variants(arch: int) -> list[dict]:
    out = []
    for dtype in _AOT_DTYPES:
        dt = SIG_DTYPE[dtype]
        ptrs = {"wk_ptr": "*fp32", "wv_ptr": "*fp32", "rows_ptr": "*i32", "row_start_ptr": "*i32",
                "dpk_ptr": f"*{dt}", "dpv_ptr": f"*{dt}"}
        cx = {"PREFIX_MODE": 3, "NEED_DK": True, "NEED_DV": True, "BLOCK": 1024,
              "FP32_DOTS": False}
        sig = aot_signature(_sum_partials_kernel, ptrs, (), cx)
        out.append({"label": f"{dt} bank", "config": "1024 w4 s1", "signature": sig,
                    "constexprs": cx, "div16": list(ptrs), "num_warps": 4, "num_stages": 1,
                    "tensor_cores": False})
    return out


def _table_spec(table: str, kernel, description: str, products: str) -> dict:
    """The AOT spec of one backward table (``_aot_variants``)."""
    return {"name": "attention_bwd_" + table, "kernel": kernel, "description": description,
            "products_per_tile": products,
            "variants": lambda arch: _aot_variants(kernel, table, arch)}


_DKDV_PRODUCTS = "4 (KQ^T, V dO^T, P^T dO, dS^T Q)"
AOT_SPECS = [
    {"name": "attention_bwd_preprocess", "kernel": _bwd_preprocess_kernel,
     "description": "delta = rowsum(dO * O) - grad_lse (backward)",
     "variants": _preprocess_variants},
    _table_spec("dq", _bwd_dq_kernel, "dQ over prefix + sequence keys (backward)",
                "3 (QK^T, dO V^T, dS K)"),
    _table_spec("dkdv", _bwd_dkdv_kernel,
                "dK/dV of the sequence keys, GQA heads reduced in-program (backward)",
                _DKDV_PRODUCTS),
    _table_spec("dkdv_dq", _bwd_dkdv_kernel,
                "dK/dV of the sequence keys with their dQ fused (float32 atomics; the 5-product "
                "backward of light calls)", "5 (KQ^T, V dO^T, P^T dO, dS^T Q, dS K)"),
    _table_spec("dq_prefix", _bwd_dq_kernel,
                "dQ over the prefix keys plus the fused accumulator (5-product backward)",
                "3 (QK^T, dO V^T, dS K), prefix keys only"),
    _table_spec("dprefix", _bwd_dprefix_kernel,
                "dprefix_k/dprefix_v partials of (batch row, query chunk), delta in-kernel "
                "(prompt-only backward); config = query rows x prefix block", _DKDV_PRODUCTS),
    {"name": "attention_bwd_dprefix_sum", "kernel": _sum_partials_kernel,
     "description": "fixed-order float32 sum of the dprefix partials per prefix (deterministic)",
     "variants": _sum_variants},
]
