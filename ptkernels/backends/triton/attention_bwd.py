"""Triton backward of ``ptkernels::prefix_attention_bwd`` (the op conventions are in
``ptkernels/ops/prefix_attention.py``; the semantics are ``ptkernels.backends.eager``'s).

Kernels, each writing its outputs once (no atomics, deterministic):

* ``_bwd_preprocess_kernel``: delta = rowsum(dO * O) - grad_lse, float32 (B, Hq, Nq).
* ``_bwd_dq_kernel``: grid (cdiv(Nq, BM), B * Hq); a query block loops over the prefix keys of
  its row's prefix, then over the sequence key blocks it can see (causal/window block skipping).
* ``_bwd_dkdv_kernel``: grid (cdiv(Nk, BN), B * Hkv); a sequence key block loops over the G query
  heads of its KV head (GQA reduction in registers) and the query blocks that can see it.
* ``_bwd_dprefix_kernel`` (``attention_bwd_prefix.py``): dprefix_k / dprefix_v, contraction over
  every query row of every batch row using that prefix.

Given the final lse and delta each segment's backward is independent, so the prompt-only
backward (only dprefix_k / dprefix_v requested: q, k, v frozen) launches just the preprocess and
the prefix kernel; the dQ and dK/dV kernels, whose cost grows with Nq * Nk, never run.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ptkernels.backends.triton.attention_bwd_prefix import (_bwd_dprefix_kernel, _dot, _dropout_keep,
                                                            _key_block_step, _load, _tanh)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(o_ptr, do_ptr, glse_ptr, delta_ptr,
                           s_ob, s_oh, s_om, s_od, s_dob, s_doh, s_dom, s_dod, s_gb, s_gh, s_gm,
                           Hq, Nq, D,
                           HAS_GLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq). delta (B, Hq, Nq) float32, contiguous."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
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
def _dq_block_step(dq, q, do, lse, delta, k_base, v_base, bias_base, kpm_base,
                   s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, s_kpm,
                   n0, offs_m, row_ok, b, h, Hq, Nseg, D, diag_off, window,
                   scale, softcap, dropout_p, seed, row_len, col0,
                   HAS_PAD: tl.constexpr, MASK_CAUSAL: tl.constexpr, MASK_WINDOW: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   INTERPRET: tl.constexpr, FP32_IN: tl.constexpr):
    """dQ contribution of the key block [n0, n0 + BLOCK_N) of one segment (prefix: col0 = 0,
    sequence: col0 = P). q, do (BM, BLOCK_D) tiles; lse (+inf on empty rows), delta (BM,)."""
    DT: tl.constexpr = k_base.dtype.element_ty
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_seg = offs_n < Nseg
    nd = in_seg[:, None] & (offs_d[None, :] < D)
    k = _load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, nd, INTERPRET)
    v = _load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, nd, INTERPRET)
    col_valid = in_seg
    if HAS_PAD:
        col_valid = col_valid & (tl.load(kpm_base + offs_n * s_kpm, mask=in_seg, other=0) != 0)

    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERPRET, FP32_IN)
    s = s * scale
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn,
                       mask=row_ok[:, None] & in_seg[None, :], other=0.0).to(tl.float32)
        s = s + bias
    visible = row_ok[:, None] & col_valid[None, :]
    if MASK_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag_off)
    if MASK_WINDOW:
        visible = visible & (offs_m[:, None] + diag_off - offs_n[None, :] < window)
    p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERPRET, FP32_IN)
    if DROPOUT:
        keep = _dropout_keep(seed, b, h, Hq, offs_m[:, None], col0 + offs_n[None, :], row_len,
                             dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    ds = ds * scale
    return _dot(ds.to(DT), k, dq, INTERPRET, FP32_IN)


@triton.jit
def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pidx_ptr, kpm_ptr, bias_ptr, do_ptr, lse_ptr,
        delta_ptr, dq_ptr,
        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
        s_pt, s_ph, s_pn, s_pd, s_pvt, s_pvh, s_pvn, s_pvd,
        s_kpb, s_kpn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod,
        s_dqb, s_dqh, s_dqm, s_dqd,
        Hq, Hkv, Nq, Nk, P, D, window, scale, softcap, dropout_p, seed,
        MODE: tl.constexpr,  # 0 shared prefix, 1 one per row, 2 bank (prefix_index)
        HAS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
        DROPOUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        INTERPRET: tl.constexpr, FP32_IN: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * Hq). dq (B, Hq, Nq, D) in q's dtype."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    b64 = b.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    md = row_ok[:, None] & (offs_d[None, :] < D)
    q = _load(q_ptr + b64 * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
              md, INTERPRET)
    do = _load(do_ptr + b64 * s_dob + h * s_doh + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod,
               md, INTERPRET)
    lse = tl.load(lse_ptr + (b64 * Hq + h) * Nq + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: p = 0
    delta = tl.load(delta_ptr + (b64 * Hq + h) * Nq + offs_m, mask=row_ok, other=0.0)
    bias_base = bias_ptr + b64 * s_bb + h * s_bh
    row_len = P + Nk
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_PREFIX:
        if MODE == 0:
            t = b64 * 0
        elif MODE == 1:
            t = b64
        else:
            t = tl.load(pidx_ptr + b).to(tl.int64)
        pk_base = pk_ptr + t * s_pt + hk * s_ph
        pv_base = pv_ptr + t * s_pvt + hk * s_pvh
        for n0 in range(0, P, BLOCK_N):
            dq = _dq_block_step(dq, q, do, lse, delta, pk_base, pv_base, bias_base, kpm_ptr,
                                s_pn, s_pd, s_pvn, s_pvd, s_bm, s_bn, 0,
                                n0, offs_m, row_ok, b, h, Hq, P, D, 0, 0,
                                scale, softcap, dropout_p, seed, row_len, 0,
                                False, False, False, HAS_BIAS, SOFTCAP, DROPOUT,
                                BLOCK_M, BLOCK_N, BLOCK_D, INTERPRET, FP32_IN)

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
        dq = _dq_block_step(dq, q, do, lse, delta, k_base, v_base, bias_base + P * s_bn,
                            kpm_ptr + b64 * s_kpb, s_kn, s_kd, s_vn, s_vd, s_bm, s_bn, s_kpn,
                            n0, offs_m, row_ok, b, h, Hq, Nk, D, diag_off, window,
                            scale, softcap, dropout_p, seed, row_len, P,
                            HAS_PAD, CAUSAL, HAS_WINDOW, HAS_BIAS, SOFTCAP, DROPOUT,
                            BLOCK_M, BLOCK_N, BLOCK_D, INTERPRET, FP32_IN)
    tl.store(dq_ptr + b64 * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=md)


@triton.jit
def _bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, kpm_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
        s_kpb, s_kpn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod,
        s_gb, s_gh, s_gn, s_gd,  # dk and dv: same (contiguous) layout
        Hq, Hkv, Nq, Nk, P, D, window, scale, softcap, dropout_p, seed,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
        NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        INTERPRET: tl.constexpr, FP32_IN: tl.constexpr):
    """Grid (cdiv(Nk, BLOCK_N), B * Hkv). dk, dv (B, Hkv, Nk, D) in k's / v's dtype."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    b64 = b.to(tl.int64)
    G = Hq // Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_seg = offs_n < Nk
    nd = in_seg[:, None] & (offs_d[None, :] < D)
    k = _load(k_ptr + b64 * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
              nd, INTERPRET)
    v = _load(v_ptr + b64 * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
              nd, INTERPRET)
    col_valid = in_seg
    if HAS_PAD:
        col_valid = col_valid & (tl.load(kpm_ptr + b64 * s_kpb + offs_n * s_kpn, mask=in_seg,
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
                CAUSAL, HAS_WINDOW, HAS_BIAS, SOFTCAP, DROPOUT, NEED_DK, NEED_DV,
                BLOCK_M, BLOCK_N, BLOCK_D, INTERPRET, FP32_IN)
    out_off = b64 * s_gb + hk * s_gh + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd
    if NEED_DK:
        tl.store(dk_ptr + out_off, dk.to(dk_ptr.dtype.element_ty), mask=nd)
    if NEED_DV:
        tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=nd)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim, for sm_80 and sm_90.
# Every entry compiles for both architectures without register spills (checked ahead of time by
# the AOT_SPECS below); larger head dims need smaller tiles to stay in registers.
_GPU_TABLE = {
    "dq": {
        64: [(64, 64, 4, 2), (128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
        128: [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2)],
        256: [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
    },
    "dkdv": {
        64: [(32, 128, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3)],
        128: [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2)],
        256: [(32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
    },
}
_GPU_TABLE["dprefix"] = _GPU_TABLE["dkdv"]
# The interpreter: one fixed small configuration (programs run one by one in Python; smaller
# tiles only add loop iterations). Tests may change it to exercise more tiles.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def gpu_configs(kernel: str, block_d: int) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _GPU_TABLE[kernel][_d_bucket(block_d)]]


_KERNELS = {"dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel, "dprefix": _bwd_dprefix_kernel}


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: str, block_d: int):
    # Every kernel writes its outputs once (stores, no accumulation), so the autotuner's
    # repeated benchmark launches leave the right result.
    return triton.autotune(configs=gpu_configs(kernel, block_d),
                           key=["Hq", "Hkv", "Nq", "P", "D"] + (["Nk"] if kernel != "dprefix" else []),
                           )(_KERNELS[kernel])


def _launch(name: str, kernel, grid, *args, **kwargs):
    """The single launch point (tests spy on it to count launches per kernel)."""
    kernel[grid](*args, **kwargs)


def _run(name: str, grid_fn, block_d: int, *args, **kwargs):
    if INTERPRET:
        meta = dict(INTERPRET_CONFIG)
        _launch(name, _KERNELS[name], grid_fn(meta), *args, **kwargs, **meta)
    else:
        _launch(name, _autotuned(name, block_d), grid_fn, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------------

def _empty(shape, dtype, device):
    """Output allocation; NaN-filled when PTKERNELS_DEBUG_POISON=1 (a kernel that forgets to
    write an element shows up)."""
    x = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("PTKERNELS_DEBUG_POISON", "0") == "1" and dtype.is_floating_point:
        x.fill_(float("nan"))
    return x


def _strides(x, n):
    return tuple(x.stride()) if x is not None else (0,) * n


def _prefix_split(num_programs: int, n_m_blocks: int, device) -> int:
    """Split the prefix kernel's query contraction when its grid is too small to fill the GPU."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_m_blocks // 2, (2 * sms) // max(num_programs, 1), 16))


def prefix_attention_bwd(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index,
                         key_padding_mask, attn_bias, dropout_seed, out, lse, causal, window,
                         softcap, scale, dropout_p, output_mask):
    """Triton ``prefix_attention_bwd``; returns (dq, dk, dv, dprefix_k, dprefix_v), empty tensors
    for the gradients ``output_mask`` does not ask for. Shapes: q, out, grad_out (B, Hq, Nq, D);
    k, v (B, Hkv, Nk, D); prefix_k/v (T, Hkv, P, D) or None; lse, grad_lse (B, Hq, Nq)."""
    need_dq, need_dk, need_dv, need_dpk, need_dpv = (bool(x) for x in output_mask)
    has_prefix = prefix_k is not None and prefix_k.shape[2] > 0
    need_dpk, need_dpv = need_dpk and has_prefix, need_dpv and has_prefix
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    p_len = prefix_k.shape[2] if has_prefix else 0
    dev = q.device
    block_d = max(16, triton.next_power_of_2(d))
    fp32_in = q.dtype == torch.float32
    dummy = torch.empty(1, dtype=q.dtype, device=dev)

    mode = 0
    if has_prefix:
        mode = 2 if prefix_index is not None else (0 if prefix_k.shape[0] == 1 else 1)
    seed = int(dropout_seed.reshape(-1)[0].item()) % 2 ** 31 if dropout_p > 0 else 0
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    lse = lse.contiguous()
    opts = dict(window=window if window > 0 else 0, scale=float(scale),
                softcap=float(softcap) if softcap > 0 else 1.0, dropout_p=float(dropout_p),
                seed=seed)
    flags = dict(HAS_BIAS=attn_bias is not None, SOFTCAP=softcap > 0, DROPOUT=dropout_p > 0,
                 BLOCK_D=block_d, INTERPRET=INTERPRET, FP32_IN=fp32_in)

    def grad_buf(x, need):
        if not need:
            return q.new_empty(0)
        return _empty(x.shape, x.dtype, dev)

    dq = grad_buf(q, need_dq)
    dk, dv = grad_buf(k, need_dk), grad_buf(v, need_dv)
    dpk = grad_buf(prefix_k, need_dpk) if prefix_k is not None else q.new_empty(0)
    dpv = grad_buf(prefix_v, need_dpv) if prefix_v is not None else q.new_empty(0)
    if not (need_dq or need_dk or need_dv or need_dpk or need_dpv) or b * hq * nq == 0:
        for g in (dq, dk, dv, dpk, dpv):
            g.zero_()
        return dq, dk, dv, dpk, dpv

    delta = torch.empty((b, hq, nq), dtype=torch.float32, device=dev)
    _launch("preprocess", _bwd_preprocess_kernel, (triton.cdiv(nq, 64), b * hq),
            out, grad_out, grad_lse if grad_lse is not None else dummy, delta,
            *out.stride(), *grad_out.stride(), *_strides(grad_lse, 3), hq, nq, d,
            HAS_GLSE=grad_lse is not None, BLOCK_M=64, BLOCK_D=block_d)

    bias = attn_bias if attn_bias is not None else dummy
    s_bias = _strides(attn_bias, 4)
    pk = prefix_k if has_prefix else dummy
    pv = prefix_v if has_prefix else dummy

    if need_dq:
        _run("dq", lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq), block_d,
             q, k, v, pk, pv, prefix_index if mode == 2 else dummy, kpm if kpm is not None else dummy,
             bias, grad_out, lse, delta, dq,
             *q.stride(), *k.stride(), *v.stride(), *_strides(prefix_k if has_prefix else None, 4),
             *_strides(prefix_v if has_prefix else None, 4), *_strides(kpm, 2), *s_bias,
             *grad_out.stride(), *dq.stride(),
             hq, hkv, nq, nk, p_len, d, **opts,
             MODE=mode, HAS_PREFIX=has_prefix, CAUSAL=bool(causal), HAS_WINDOW=window > 0,
             HAS_PAD=kpm is not None, **flags)

    if (need_dk or need_dv) and nk > 0:
        like = dk if need_dk else dv
        _run("dkdv", lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), b * hkv), block_d,
             q, k, v, kpm if kpm is not None else dummy, bias, grad_out, lse, delta,
             dk if need_dk else dummy, dv if need_dv else dummy,
             *q.stride(), *k.stride(), *v.stride(), *_strides(kpm, 2), *s_bias,
             *grad_out.stride(), *like.stride(),
             hq, hkv, nq, nk, p_len, d, **opts,
             CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_PAD=kpm is not None,
             NEED_DK=need_dk, NEED_DV=need_dv, **flags)

    if need_dpk or need_dpv:
        t = prefix_k.shape[0]
        if mode == 2:
            rows = torch.argsort(prefix_index, stable=True).to(torch.int32)
            counts = torch.bincount(prefix_index, minlength=t)
            row_start = torch.zeros(t + 1, dtype=torch.int32, device=dev)
            row_start[1:] = torch.cumsum(counts, 0)
        else:
            rows = row_start = dummy
        nsplit = _prefix_split(triton.cdiv(p_len, 64) * t * hkv, triton.cdiv(nq, 64), dev)
        if nsplit > 1:  # float32 partials, summed below in a fixed order
            gk = torch.empty((nsplit,) + tuple(prefix_k.shape), dtype=torch.float32, device=dev)
            gv = torch.empty_like(gk)
            s_g = gk.stride()
        else:
            gk, gv = (dpk if need_dpk else dummy), (dpv if need_dpv else dummy)
            like = dpk if need_dpk else dpv
            s_g = (0,) + tuple(like.stride())
        _run("dprefix", lambda meta: (triton.cdiv(p_len, meta["BLOCK_N"]), t * hkv, nsplit), block_d,
             q, grad_out, lse, delta, prefix_k, prefix_v, bias, rows, row_start, gk, gv,
             *q.stride(), *grad_out.stride(), *prefix_k.stride(), *prefix_v.stride(), *s_bias, *s_g,
             b, hq, hkv, nq, p_len, d, p_len + nk,
             opts["scale"], opts["softcap"], opts["dropout_p"], seed,
             MODE=mode, NEED_DK=need_dpk, NEED_DV=need_dpv, NSPLIT=nsplit, **flags)
        if nsplit > 1:
            if need_dpk:
                dpk.copy_(gk.sum(0))
            if need_dpv:
                dpv.copy_(gv.sum(0))
    if need_dk and nk == 0:
        dk.zero_()
    if need_dv and nk == 0:
        dv.zero_()
    return dq, dk, dv, dpk, dpv
