"""Triton forward of ``prefix_attention``: fused online-softmax attention over a prefix + sequence.

One program owns BLOCK_M query rows of one (batch row b, query head h) and runs the FlashAttention
online softmax (``attention_fwd_blocks.attend_blocks``) over two key segments:

1. the prefix (T, Hkv, P, D) that row b reads (``PREFIX_MODE``: shared, one per row, or a bank
   chosen by prefix_index); prefix keys are never masked;
2. the sequence (B, Hkv, Nk, D) with bottom-right causal (query i sees key j iff
   j <= i + Nk - Nq), a key padding mask and a sliding window ((i + Nk - Nq) - j < window).
   Key blocks that causal / window masking leaves empty for the whole row block are skipped by
   the loop bounds, not computed.

Masks cost only on boundary blocks (FlashAttention-2's split of the key loop): the whole prefix
blocks and the interior sequence blocks (``interior_bounds``: visible to every row of the
program) run without mask arithmetic; the prefix tail block, the window edge band, the causal
diagonal band and the sequence tail run masked. The blocks are visited in key order, as before
the split, so the summation order and the results are unchanged. The key padding mask is
applied to every sequence block when present.

GQA/MQA map head h to KV head h // (Hq // Hkv). Outputs: out (B, Hq, Nq, D) in q's dtype
(contiguous) and lse (B, Hq, Nq) float32 natural log, -inf for rows that see no key (their output
is exactly 0).

Dispatch (``prefix_attention_fwd``): the split-K decode path (``decode.py``) runs when
``Nq <= DECODE_MAX_NQ`` and ``P + Nk >= DECODE_MIN_KEYS`` (generation with a KV cache: a few query
rows against many keys, where one program per row block would leave the GPU idle); the main
kernel runs otherwise. Both give the same results (up to summation order) and the same lse, so
the backward does not care which one ran.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptkernels.backends import DECODE_MAX_NQ, DECODE_MIN_KEYS, is_decode_shape  # noqa: F401
from ptkernels.backends.triton._common import alloc, cast_rounded, prefix_of_row
from ptkernels.backends.triton.attention_fwd_blocks import (Launch, aot_variants, attend_blocks,
                                                            bias_rows, finish_rows,
                                                            launch_with_config, start_query_block)
from ptkernels.backends.triton.decode import forward_decode
from ptkernels.backends.triton.masks import interior_bounds, sequence_bounds


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pidx_ptr, kpm_ptr, bias_ptr, out_ptr, lse_ptr,
                s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                s_pkt, s_pkh, s_pkn, s_pkd, s_pvt, s_pvh, s_pvn, s_pvd,
                s_kpmb, s_kpmn, s_bb, s_bh, s_bm, s_bn, s_ob, s_oh, s_om,
                Hq, Nq, Nk, P, G, seed, scale, softcap, dropout_p, window,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PREFIX_MODE: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, FP32_DOTS: tl.constexpr):
    # grid (cdiv(Nq, BLOCK_M) * B * Hq,): the query block varies fastest (programs of one head
    # share its K/V in L2); (b, h) folded into axis 0, so B * Hq has no 65,535 limit.
    n_mb = tl.cdiv(Nq, BLOCK_M)
    pid_m = tl.program_id(0) % n_mb
    bh = tl.program_id(0) // n_mb
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    kvh = h // G
    m0 = pid_m * BLOCK_M
    rows, row_ok, offs_d, d_ok, q, acc, m_i, l_i = start_query_block(
        q_ptr, s_qb, s_qh, s_qm, s_qd, b, h, m0, Nq, D, BLOCK_M, BLOCK_D, FP32_DOTS)
    bias_ptrs = bias_rows(bias_ptr + b * s_bb + h * s_bh, rows, s_bm, HAS_BIAS)
    n_cols = P + Nk
    q_off = Nk - Nq
    # interior blocks unmasked (attend_blocks) up to D = 128; above, every block is masked (the
    # branch pushes the 32x32 w4 D = 256 configs into spills)
    SPLIT: tl.constexpr = BLOCK_D <= 128

    if PREFIX_MODE != 0:
        t = prefix_of_row(pidx_ptr, b, PREFIX_MODE)
        pk_base = pk_ptr + t * s_pkt + kvh * s_pkh
        pv_base = pv_ptr + t * s_pvt + kvh * s_pvh
        # whole prefix blocks run without mask, the tail block masked
        acc, m_i, l_i = attend_blocks(
            acc, m_i, l_i, q, pk_base, pv_base, s_pkn, s_pkd, s_pvn, s_pvd, 0, P, 0,
            (P // BLOCK_N) * BLOCK_N, P, 0, n_cols, rows, row_ok, bias_ptrs, s_bn, kpm_ptr,
            s_kpmn, seed, bh, dropout_p, scale, softcap, window, q_off, D, BLOCK_N, BLOCK_D,
            False, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT, FP32_DOTS,
            SPLIT)
    # Sequence keys [lo, hi): the blocks of the interior [ilo, ihi) run without mask
    # arithmetic; the window edge band [lo, ilo), the causal diagonal band and the tail
    # [ihi, hi) masked.
    lo, hi = sequence_bounds(m0, Nk, q_off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    ilo, ihi = interior_bounds(lo, hi, m0, Nk, q_off, window, BLOCK_M, BLOCK_N, CAUSAL,
                               HAS_WINDOW)
    acc, m_i, l_i = attend_blocks(
        acc, m_i, l_i, q, k_ptr + b * s_kb + kvh * s_kh, v_ptr + b * s_vb + kvh * s_vh, s_kn,
        s_kd, s_vn, s_vd, lo, hi, ilo, ihi, Nk, P, n_cols, rows, row_ok, bias_ptrs, s_bn,
        kpm_ptr + b * s_kpmb, s_kpmn, seed, bh, dropout_p, scale, softcap, window, q_off, D,
        BLOCK_N, BLOCK_D, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_BIAS, HAS_SOFTCAP, HAS_DROPOUT,
        FP32_DOTS, SPLIT)

    out, lse = finish_rows(acc, m_i, l_i)
    OT: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_d[None, :],
             cast_rounded(out, OT, FP32_DOTS), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)


def forward_main(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                 dropout_seed, causal, window, softcap, scale, dropout_p):
    """The main (one program per BLOCK_M query rows) forward; returns (out, lse)."""
    L = Launch(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
               dropout_seed, causal, window, softcap, scale, dropout_p)
    out = alloc((L.b, L.hq, L.nq, L.d), q.dtype, q.device)
    lse = alloc((L.b, L.hq, L.nq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    def run(cfg):
        grid = (triton.cdiv(L.nq, cfg.block_m) * L.b * L.hq,)
        _fwd_kernel[grid](*L.tensors, out, lse, *L.strides, *out.stride()[:3], *L.scalars,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=L.block_d,
                          **L.flags, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    launch_with_config("fwd", L, run)
    return out, lse


def use_decode(nq: int, p: int, nk: int) -> bool:
    """The dispatch rule: split-K decode for few query rows against many keys."""
    return is_decode_shape(nq, p + nk)


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                         dropout_seed, causal, window, softcap, scale, dropout_p):
    """Backend entry point (signature of ``ptkernels.backends.eager.prefix_attention_fwd``)."""
    p = 0 if prefix_k is None else prefix_k.shape[2]
    fn = forward_decode if use_decode(q.shape[2], p, k.shape[2]) else forward_main
    return fn(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
              dropout_seed, causal, window, softcap, scale, dropout_p)


AOT_SPECS = [{"name": "attention_fwd", "kernel": _fwd_kernel,
              "description": "fused prefix + sequence attention forward (main path)",
              "products_per_tile": "2 (QK^T, PV)",
              "variants": lambda arch: aot_variants(_fwd_kernel, "fwd", arch)}]
