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

from ptkernels.backends.triton._common import mma


# FP32_DOTS (a constexpr of every kernel here): upcast tiles right after the load and multiply in
# exact fp32 (``mma``'s interpreter branch: "ieee" dots). True under the interpreter (bf16 math on
# raw bits is garbage there) and, on the GPU, for float32 inputs with a head dim > 128, where the
# 3xTF32 tensor-core tiles cannot avoid register spills; False elsewhere (tensor cores).


@triton.jit
def _load(ptrs, mask, FP32_DOTS: tl.constexpr):
    """Masked load; with FP32_DOTS upcast at once (no bf16 arithmetic in the interpreter)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if FP32_DOTS:
        x = x.to(tl.float32)
    return x


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1) (the forward's formula): exact limits +-1 at overflow.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dropout_keep_t(seed, bh, rows, cols, n_cols, p):
    """``dropout.dropout_keep`` laid out (cols, rows) for this (keys x queries) tile: the same
    formula element by element, keep = rand(seed + bh, i * (P + Nk) + j) >= p. Generating it
    transposed avoids a layout conversion (shared memory + registers) of the (rows, cols) mask."""
    head_seed = bh.to(tl.int64) + seed
    offsets = rows[None, :] * n_cols + cols[:, None]
    return tl.rand(head_seed, offsets.to(tl.int32)) >= p


@triton.jit
def _key_block_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base,
                    s_qm, s_qd, s_dom, s_dod, s_bm, s_bn,
                    m0, offs_n, col_valid, b, h, Hq, Nq, D, diag_off, window,
                    scale, softcap, dropout_p, seed, row_len, col0,
                    MASK_CAUSAL: tl.constexpr, MASK_WINDOW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
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
    q = _load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, md, FP32_DOTS)
    do = _load(do_base + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod, md, FP32_DOTS)
    # Rows past Nq or that see no key (lse == -inf) get lse = +inf: probability exactly 0.
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)

    s = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), FP32_DOTS)
    s = s * scale
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[None, :] * s_bm + offs_n[:, None] * s_bn,
                       mask=row_ok[None, :] & col_valid[:, None], other=0.0).to(tl.float32)
        s = s + bias
    visible = col_valid[:, None] & row_ok[None, :]
    if MASK_CAUSAL:  # bottom-right: key j visible to query i iff j <= i + (Nk - Nq)
        visible = visible & (offs_n[:, None] <= offs_m[None, :] + diag_off)
    if MASK_WINDOW:
        visible = visible & (offs_m[None, :] + diag_off - offs_n[:, None] < window)
    p = tl.where(visible, tl.exp(s - lse[None, :]), 0.0)
    if DROPOUT:
        keep = _dropout_keep_t(seed, b * Hq + h, offs_m, col0 + offs_n, row_len, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_drop = tl.where(keep, p * inv_keep, 0.0)
    else:
        p_drop = p
    if NEED_DV:
        dv = mma(p_drop.to(DT), do, dv, FP32_DOTS)
    if NEED_DK:
        dp = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), FP32_DOTS)
        if DROPOUT:
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[None, :])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds = ds * scale
        dk = mma(ds.to(DT), q, dk, FP32_DOTS)
    return dk, dv


@triton.jit
def _bwd_dprefix_kernel(
        q_ptr, do_ptr, lse_ptr, delta_ptr, pk_ptr, pv_ptr, bias_ptr, rows_ptr, row_start_ptr,
        dpk_ptr, dpv_ptr,
        s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod,
        s_pt, s_ph, s_pn, s_pd, s_vt, s_vh, s_vn, s_vd,
        s_bb, s_bh, s_bm, s_bn,
        s_gs, s_gt, s_gh, s_gn, s_gd,  # dpk/dpv (or their float32 split partials): same layout
        B, Hq, Hkv, Nq, P, D, row_len,
        scale, softcap, dropout_p, seed,
        MODE: tl.constexpr,  # 0: shared by the batch, 1: one per row, 2: bank (rows listed)
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
        NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, NSPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32_DOTS: tl.constexpr):
    """Grid (cdiv(P, BLOCK_N), T * Hkv, NSPLIT). prefix_k/v (T, Hkv, P, D); dprefix the same
    (with a leading NSPLIT dimension when split). Bank: ``rows_ptr`` holds the batch rows sorted
    by prefix, ``row_start_ptr`` (T + 1,) where prefix t's rows start."""
    pid_n = tl.program_id(0)
    th = tl.program_id(1)
    split = tl.program_id(2)
    t = th // Hkv
    hk = th % Hkv
    G = Hq // Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_valid = offs_n < P
    nd = col_valid[:, None] & (offs_d[None, :] < D)
    t64 = t.to(tl.int64)
    k = _load(pk_ptr + t64 * s_pt + hk * s_ph + offs_n[:, None] * s_pn + offs_d[None, :] * s_pd,
              nd, FP32_DOTS)
    v = _load(pv_ptr + t64 * s_vt + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
              nd, FP32_DOTS)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if MODE == 0:
        r_lo = 0
        r_hi = B
    elif MODE == 1:
        r_lo = t
        r_hi = t + 1
    else:
        r_lo = tl.load(row_start_ptr + t).to(tl.int32)
        r_hi = tl.load(row_start_ptr + t + 1).to(tl.int32)
    for r in range(r_lo, r_hi):
        if MODE == 2:
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
                    False, False, HAS_BIAS, SOFTCAP, DROPOUT, NEED_DK, NEED_DV,
                    BLOCK_M, BLOCK_N, BLOCK_D, FP32_DOTS)
    out_off = (split * s_gs + t64 * s_gt + hk * s_gh + offs_n[:, None] * s_gn
               + offs_d[None, :] * s_gd)
    if NEED_DK:
        tl.store(dpk_ptr + out_off, dk.to(dpk_ptr.dtype.element_ty), mask=nd)
    if NEED_DV:
        tl.store(dpv_ptr + out_off, dv.to(dpv_ptr.dtype.element_ty), mask=nd)
