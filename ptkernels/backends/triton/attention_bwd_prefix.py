"""Triton backward of prefix attention, key side: the tile step shared with the sequence dK/dV
kernel, and the prefix-gradient kernels (dprefix_k, dprefix_v).

Given the FINAL logsumexp and ``delta = rowsum(dO * O) - grad_lse``, each key segment's backward
is independent: for a key block K_j, V_j and a query block,

    P^T  = exp(K_j Q^T * scale - lse)             (BN, BM), probabilities of this key block
    dV_j += (P^T * keep / (1 - p)) @ dO
    dP^T = (V_j dO^T) * keep / (1 - p)
    dS^T = P^T * (dP^T - delta) * tanh'(...) * scale
    dK_j += dS^T @ Q

``_key_tile_grads`` does this for one (BN keys) x (BM queries) tile from tiles already loaded;
the sequence dK/dV kernel (``attention_bwd.py``) and the prefix kernel below both call it.

Prefix gradients, built for their shape (a small prefix, every query row of every batch row
contracted into it): ``_bwd_dprefix_kernel`` holds the whole prefix of one KV head in one
power-of-two block (``prefix_block``: 16 to 128 rows by head dim and features; a longer prefix is
split over several blocks) with its two float32 accumulators, and steps over BLOCK_M query rows
at a time (16 to 128: as many as fit in registers next to the accumulators, see the table in
``attention_bwd.py``). Its grid is (prefix blocks x query chunks x B x Hkv): every (batch row,
chunk of query rows) pair is its own program, so a shared prefix (T = 1) still fills the GPU; the
G query heads of the KV head are reduced in the program's registers (GQA). delta is computed in
the kernel from the O and dO tiles it loads (no separate pass, no delta tensor). Each program
writes its float32 partial (B, n_chunk, Hkv, P, D); ``_sum_partials_kernel`` then sums, for
every prefix t, the
partials of the batch rows that use t (shared: all rows; per row: row t; bank: the rows with
prefix_index[b] == t, listed by the host) in a fixed order (row, then chunk) and casts to the
prefix dtype. No atomics: results are bitwise reproducible run to run. Bank prefixes no row chose
get exact zeros.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ptkernels.backends.triton._common import (LOG2E, cast_rounded, load_tile, log2_scores, mma,
                                              prefix_of_row, round_to, score_grad)
from ptkernels.backends.triton.dropout import dropout_keep_t
from ptkernels.backends.triton.masks import mask_scores


@triton.jit
def _query_tiles(q_base, do_base, lse_base, s_qm, s_qd, s_dom, s_dod, offs_m, row_ok, offs_d,
                 D: tl.constexpr, FP32_DOTS: tl.constexpr):
    """The Q and dO tiles (BM, BLOCK_D) of query rows offs_m (zeros where not row_ok or past D),
    their column mask md and lse2 = lse * log2(e): +inf on rows not row_ok or that see no key
    (lse == -inf), whose probabilities are then exactly 0."""
    md = row_ok[:, None] & (offs_d[None, :] < D)
    q = load_tile(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, md, FP32_DOTS)
    do = load_tile(do_base + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod, md, FP32_DOTS)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    return q, do, md, lse2


@triton.jit
def _key_tile_grads(dk, dv, k, v, q, do, lse2, delta, bias_base, s_bm, s_bn,
                    offs_m, row_ok, offs_n, col_ok, key_keep, b, h, Hq, diag_off, window,
                    scale, softcap, dropout_p, seed, n0, col0,
                    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, MASK_CAUSAL: tl.constexpr, MASK_WINDOW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, DT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOTS: tl.constexpr):
    """dK/dV contributions of one query tile to one key tile; returns the updated float32 (dk, dv)
and the (BN, BM) float32 score gradient dS^T (scaled; meaningful only with NEED_DK), from which
the fused backward (``attention_bwd.py``) adds this tile's dQ = dS K.

    k, v: (BN, BLOCK_D) key tiles; q, do: (BM, BLOCK_D) query tiles (zeros past Nq / D);
    lse2 (BM,) = lse * log2(e), +inf on rows past Nq or that see no key; delta (BM,);
    offs_m (BM,) query rows, row_ok (BM,) rows < Nq; offs_n (BN,) key index within its segment,
    n0 + [0, BN) (n0 a multiple of 4: the dropout draws serve groups of 4 keys); col_ok (BN,)
    keys inside the segment; key_keep (BN,) keys the padding mask keeps (read with HAS_KPM:
    applied to every tile); MASKED: a boundary tile (the tail, the causal diagonal band or the
    window edge band, ``masks.py``) whose scores get the mask, off for an interior tile (the
    prefix kernel masks every tile: its tail rows' gradients are never stored, but without the
    mask its dropout tiles spill at D = 128); col0 the segment's first column in the
    P + Nk score row (0 for the prefix, P for the sequence); bias_base points at the segment's
    first column of head (b, h); DT the inputs' dtype (P and dS are rounded to it before their
    products, as on the GPU, also under FP32_DOTS).
    """
    s = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), FP32_DOTS)
    # base 2 (log2(e) folded into the scale, lse2 = lse * log2(e)): one exp2 per score
    s, t = log2_scores(s, scale, softcap, HAS_SOFTCAP)  # base 2, as lse2
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[None, :] * s_bm + offs_n[:, None] * s_bn,
                       mask=row_ok[None, :] & col_ok[:, None], other=0.0).to(tl.float32)
        s = s + bias * LOG2E
    if HAS_KPM:
        s = tl.where(key_keep[:, None], s, float("-inf"))
    if MASKED:  # rows past Nq need no mask (lse2 = +inf: p = 0)
        s = mask_scores(s, offs_n, col_ok, offs_m, diag_off, window, True, MASK_CAUSAL,
                        MASK_WINDOW, True)
    p = tl.exp2(s - lse2[None, :])
    if HAS_DROPOUT:
        keep = dropout_keep_t(seed, b * Hq + h, offs_m, col0, n0, dropout_p, BLOCK_N)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_drop = tl.where(keep, p * inv_keep, 0.0)
    else:
        p_drop = p
    if NEED_DV:
        dv = mma(round_to(p_drop, DT, FP32_DOTS), do, dv, FP32_DOTS)
    ds = p  # returned unused when dK is not needed (dQ is fused only into calls that need dK)
    if NEED_DK:
        dp = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), FP32_DOTS)
        if HAS_DROPOUT:
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = score_grad(p * (dp - delta[None, :]), t, scale, HAS_SOFTCAP)
        dk = mma(round_to(ds, DT, FP32_DOTS), q, dk, FP32_DOTS)
    return dk, dv, ds


def prefix_block(p_len: int, blocks) -> int:
    """BLOCK_P for a prefix of ``p_len`` rows: the smallest of ``blocks`` (the prefix blocks of
    the call's configuration table) that holds the whole prefix, else the largest."""
    blocks = sorted(set(blocks))
    return next((bp for bp in blocks if p_len <= bp), blocks[-1])


@triton.jit
def _bwd_dprefix_kernel(
        q_ptr, do_ptr, o_ptr, lse_ptr, glse_ptr, pk_ptr, pv_ptr, pidx_ptr, bias_ptr,
        wk_ptr, wv_ptr,
        s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod, s_ob, s_oh, s_om, s_od,
        s_gb, s_gh, s_gm,
        s_pkt, s_pkh, s_pkn, s_pkd, s_pvt, s_pvh, s_pvn, s_pvd,
        s_bb, s_bh, s_bm, s_bn,
        Hq, Hkv, Nq, P, rows_per_chunk, n_chunk,
        scale, softcap, dropout_p, seed,
        D: tl.constexpr,
        PREFIX_MODE: tl.constexpr,  # ptk::PrefixMode: 1 shared, 2 one per row, 3 bank
        HAS_GLSE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32_DOTS: tl.constexpr):
    """Grid (cdiv(P, BLOCK_P) * n_chunk * B * Hkv,). Program (p-block, chunk c, b, hk): the
    prefix rows [p0, p0 + BLOCK_P) of row b's prefix, KV head hk, contracted over the G query
    heads of hk and the query rows [c * rows_per_chunk, (c + 1) * rows_per_chunk). Writes its
    float32 partials wk / wv (B, n_chunk, Hkv, P, D), contiguous (zeros when its chunk is empty)."""
    DT: tl.constexpr = q_ptr.dtype.element_ty
    n_pb = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    pid_p = pid % n_pb
    chunk = (pid // n_pb) % n_chunk
    bhk = pid // (n_pb * n_chunk)
    b64 = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    G = Hq // Hkv
    t = prefix_of_row(pidx_ptr, b64, PREFIX_MODE)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_valid = offs_p < P
    pd = p_valid[:, None] & (offs_d[None, :] < D)
    k = load_tile(pk_ptr + t * s_pkt + hk * s_pkh + offs_p[:, None] * s_pkn
                  + offs_d[None, :] * s_pkd, pd, FP32_DOTS)
    v = load_tile(pv_ptr + t * s_pvt + hk * s_pvh + offs_p[:, None] * s_pvn
                  + offs_d[None, :] * s_pvd, pd, FP32_DOTS)
    dk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    m_lo = chunk * rows_per_chunk
    m_hi = tl.minimum(m_lo + rows_per_chunk, Nq)
    for g in range(0, G):
        h = hk * G + g
        q_base = q_ptr + b64 * s_qb + h * s_qh
        do_base = do_ptr + b64 * s_dob + h * s_doh
        o_base = o_ptr + b64 * s_ob + h * s_oh
        lse_base = lse_ptr + (b64 * Hq + h) * Nq
        bias_base = bias_ptr + b64 * s_bb + h * s_bh
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < m_hi  # rows past the chunk: lse2 = +inf, p exactly 0
            q, do, md, lse2 = _query_tiles(q_base, do_base, lse_base, s_qm, s_qd, s_dom, s_dod,
                                           offs_m, row_ok, offs_d, D, FP32_DOTS)
            if NEED_DK:  # delta = rowsum(dO * O) - grad_lse, here instead of a separate pass
                o = tl.load(o_base + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=md,
                            other=0.0).to(tl.float32)
                delta = tl.sum(do.to(tl.float32) * o, axis=1)
                if HAS_GLSE:
                    delta -= tl.load(glse_ptr + b64 * s_gb + h * s_gh + offs_m * s_gm,
                                     mask=row_ok, other=0.0).to(tl.float32)
            else:
                delta = tl.zeros([BLOCK_M], tl.float32)
            dk, dv, _ = _key_tile_grads(
                dk, dv, k, v, q, do, lse2, delta, bias_base, s_bm, s_bn,
                offs_m, row_ok, offs_p, p_valid, p_valid, b64, h, Hq, 0, 0,
                scale, softcap, dropout_p, seed, pid_p * BLOCK_P, 0,
                True, False, False, False, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, NEED_DK, NEED_DV,
                DT, BLOCK_M, BLOCK_P, FP32_DOTS)
    # partial (b, chunk, hk, p, d) of the contiguous (B, n_chunk, Hkv, P, D) workspace
    out_off = ((b64 * n_chunk + chunk) * Hkv + hk) * P * D + offs_p[:, None] * D + offs_d[None, :]
    if NEED_DK:
        tl.store(wk_ptr + out_off, dk, mask=pd)
    if NEED_DV:
        tl.store(wv_ptr + out_off, dv, mask=pd)


@triton.jit
def _sum_partials_kernel(wk_ptr, wv_ptr, rows_ptr, row_start_ptr, dpk_ptr, dpv_ptr,
                         B, Hkv, PD, n_chunk,
                         PREFIX_MODE: tl.constexpr,
                         NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, BLOCK: tl.constexpr,
                         FP32_DOTS: tl.constexpr):
    """Grid (cdiv(P * D, BLOCK), T * Hkv). dprefix[t, hk] (contiguous (T, Hkv, P, D), PD = P * D
    elements per head) = the sum of the partials of the rows using prefix t, in a fixed order
    (rows ascending, then chunks), in float32, cast once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    th = tl.program_id(1)
    t = th // Hkv
    hk = (th % Hkv).to(tl.int64)  # int64 offsets below
    ok = offs < PD
    if PREFIX_MODE == 1:
        r_lo = 0
        r_hi = B
    elif PREFIX_MODE == 2:
        r_lo = t
        r_hi = t + 1
    else:
        r_lo = tl.load(row_start_ptr + t)
        r_hi = tl.load(row_start_ptr + t + 1)
    acc_k = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    for r in range(r_lo, r_hi):
        if PREFIX_MODE == 3:
            b = tl.load(rows_ptr + r)
        else:
            b = r
        for c in range(0, n_chunk):
            src = ((b * n_chunk + c) * Hkv + hk) * PD + offs
            if NEED_DK:
                acc_k += tl.load(wk_ptr + src, mask=ok, other=0.0)
            if NEED_DV:
                acc_v += tl.load(wv_ptr + src, mask=ok, other=0.0)
    dst = th.to(tl.int64) * PD + offs
    if NEED_DK:
        tl.store(dpk_ptr + dst, cast_rounded(acc_k, dpk_ptr.dtype.element_ty, FP32_DOTS), mask=ok)
    if NEED_DV:
        tl.store(dpv_ptr + dst, cast_rounded(acc_v, dpv_ptr.dtype.element_ty, FP32_DOTS), mask=ok)
