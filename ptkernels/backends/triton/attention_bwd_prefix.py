"""Triton backward of prefix attention, key side: the shared building blocks and the
prefix-gradient kernel (dprefix_k, dprefix_v).

Given the FINAL logsumexp and ``delta = rowsum(dO * O) - grad_lse`` (the preprocess kernel in
``attention_bwd.py``), each key segment's backward is independent: for a key block K_j, V_j,

    P^T  = exp(K_j Q^T * scale - lse)             (BN, BM), probabilities of this key block
    dV_j += (P^T * keep / (1 - p)) @ dO
    dP^T = (V_j dO^T) * keep / (1 - p)
    dS^T = P^T * (dP^T - delta) * tanh'(...) * scale
    dK_j += dS^T @ Q

``_key_block_step`` does this for one (BN keys) x (BM queries) tile; the sequence dK/dV kernel and
the prefix kernel below both loop it.

The prefix gradient is a GEMM whose contraction runs over every query row that sees the prefix:
a program owns a prefix block (t, h_kv, p-block) and loops over the batch rows b whose prefix is
t (shared: all rows; per-row: row t; bank: the rows with prefix_index[b] == t, listed by the host
in ``bank_rows``), the G query heads of the KV head and all Nq query blocks, accumulating in
float32 registers; it writes once, without atomics (deterministic). Bank prefixes no row chose
get exact zeros. With ``NSPLIT > 1`` the query blocks are split over NSPLIT programs writing float32
partials that the host sums in a fixed order (still deterministic): more programs when T * Hkv *
cdiv(P, BN) is small compared with the number of SMs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ptkernels.backends.triton._common import LOG2E, cast_rounded, load_tile, mma, round_to, tanh
from ptkernels.backends.triton.dropout import dropout_keep_t


@triton.jit
def _key_block_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base,
                    s_qm, s_qd, s_dom, s_dod, s_bm, s_bn,
                    m0, offs_n, col_valid, b, h, Hq, Nq, D: tl.constexpr, diag_off, window,
                    scale, softcap, dropout_p, seed, row_len, col0,
                    MASK_CAUSAL: tl.constexpr, MASK_WINDOW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP32_DOTS: tl.constexpr):
    """dK/dV contributions of the query block [m0, m0 + BLOCK_M) of head (b, h) to one key block.

    k, v: (BN, BLOCK_D) tiles; offs_n (BN,) key index within its segment; col_valid (BN,) keys
    that exist and are not padded; col0 the segment's first column in the P + Nk score row
    (0 for the prefix, P for the sequence). Returns the updated float32 (dk, dv).
    """
    DT: tl.constexpr = q_base.dtype.element_ty
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    md = row_ok[:, None] & (offs_d[None, :] < D)
    q = load_tile(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, md, FP32_DOTS)
    do = load_tile(do_base + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod, md, FP32_DOTS)
    # Rows past Nq or that see no key (lse == -inf) get lse = +inf: probability exactly 0.
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)

    s = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), FP32_DOTS)
    # base 2 (log2(e) folded into the scale, lse2 = lse * log2(e)): one exp2 per score
    if HAS_SOFTCAP:
        t = tanh(s * (scale / softcap))
        s = (softcap * LOG2E) * t
    else:
        s = s * (scale * LOG2E)
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[None, :] * s_bm + offs_n[:, None] * s_bn,
                       mask=row_ok[None, :] & col_valid[:, None], other=0.0).to(tl.float32)
        s = s + bias * LOG2E
    visible = col_valid[:, None] & row_ok[None, :]
    if MASK_CAUSAL:  # bottom-right: key j visible to query i iff j <= i + (Nk - Nq)
        visible = visible & (offs_n[:, None] <= offs_m[None, :] + diag_off)
    if MASK_WINDOW:
        visible = visible & (offs_m[None, :] + diag_off - offs_n[:, None] < window)
    p = tl.where(visible, tl.exp2(s - lse2[None, :]), 0.0)
    if HAS_DROPOUT:
        keep = dropout_keep_t(seed, b * Hq + h, offs_m, col0 + offs_n, row_len, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_drop = tl.where(keep, p * inv_keep, 0.0)
    else:
        p_drop = p
    if NEED_DV:
        dv = mma(round_to(p_drop, DT, FP32_DOTS), do, dv, FP32_DOTS)
    if NEED_DK:
        dp = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), FP32_DOTS)
        if HAS_DROPOUT:
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[None, :])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds = ds * scale
        dk = mma(round_to(ds, DT, FP32_DOTS), q, dk, FP32_DOTS)
    return dk, dv


@triton.jit
def _bwd_dprefix_kernel(
        q_ptr, do_ptr, lse_ptr, delta_ptr, pk_ptr, pv_ptr, bias_ptr, rows_ptr, row_start_ptr,
        dpk_ptr, dpv_ptr,
        s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod,
        s_pkt, s_pkh, s_pkn, s_pkd, s_pvt, s_pvh, s_pvn, s_pvd,
        s_bb, s_bh, s_bm, s_bn,
        s_gs, s_gt, s_gh, s_gn, s_gd,  # dpk/dpv (or their float32 split partials): same layout
        B, Hq, Hkv, Nq, P, row_len,
        scale, softcap, dropout_p, seed,
        D: tl.constexpr,
        PREFIX_MODE: tl.constexpr,  # 1: shared by the batch, 2: one per row, 3: bank (rows listed)
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, NSPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32_DOTS: tl.constexpr):
    """Grid (cdiv(P, BLOCK_N) * T * Hkv, NSPLIT). prefix_k/v (T, Hkv, P, D); dprefix the same
    (with a leading NSPLIT dimension when split). Bank: ``rows_ptr`` holds the batch rows sorted
    by prefix, ``row_start_ptr`` (T + 1,) where prefix t's rows start."""
    n_pb = tl.cdiv(P, BLOCK_N)
    pid_n = tl.program_id(0) % n_pb
    th = tl.program_id(0) // n_pb
    split = tl.program_id(1)
    t = th // Hkv
    hk = (th % Hkv).to(tl.int64)
    G = Hq // Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_valid = offs_n < P
    nd = col_valid[:, None] & (offs_d[None, :] < D)
    t64 = t.to(tl.int64)
    k = load_tile(pk_ptr + t64 * s_pkt + hk * s_pkh + offs_n[:, None] * s_pkn + offs_d[None, :] * s_pkd,
              nd, FP32_DOTS)
    v = load_tile(pv_ptr + t64 * s_pvt + hk * s_pvh + offs_n[:, None] * s_pvn + offs_d[None, :] * s_pvd,
              nd, FP32_DOTS)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if PREFIX_MODE == 1:
        r_lo = 0
        r_hi = B
    elif PREFIX_MODE == 2:
        r_lo = t
        r_hi = t + 1
    else:
        r_lo = tl.load(row_start_ptr + t).to(tl.int32)
        r_hi = tl.load(row_start_ptr + t + 1).to(tl.int32)
    for r in range(r_lo, r_hi):
        if PREFIX_MODE == 3:
            b = tl.load(rows_ptr + r).to(tl.int32)
        else:
            b = r
        b64 = b.to(tl.int64)
        for g in range(0, G):
            h = hk * G + g
            q_base = q_ptr + b64 * s_qb + h * s_qh
            do_base = do_ptr + b64 * s_dob + h * s_doh
            lse_base = lse_ptr + (b64 * Hq + h) * Nq
            delta_base = delta_ptr + (b64 * Hq + h) * Nq
            bias_base = bias_ptr + b64 * s_bb + h * s_bh
            for m0 in range(split * BLOCK_M, Nq, NSPLIT * BLOCK_M):
                dk, dv = _key_block_step(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base,
                    s_qm, s_qd, s_dom, s_dod, s_bm, s_bn,
                    m0, offs_n, col_valid, b, h, Hq, Nq, D, 0, 0,
                    scale, softcap, dropout_p, seed, row_len, 0,
                    False, False, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, NEED_DK, NEED_DV,
                    BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
    out_off = (split * s_gs + t64 * s_gt + hk * s_gh + offs_n[:, None] * s_gn
               + offs_d[None, :] * s_gd)
    if NEED_DK:
        tl.store(dpk_ptr + out_off, cast_rounded(dk, dpk_ptr.dtype.element_ty, FP32_DOTS), mask=nd)
    if NEED_DV:
        tl.store(dpv_ptr + out_off, cast_rounded(dv, dpv_ptr.dtype.element_ty, FP32_DOTS), mask=nd)
