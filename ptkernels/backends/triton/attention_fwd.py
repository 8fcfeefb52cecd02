"""Triton forward of ``prefix_attention``: fused online-softmax attention over a prefix + sequence.

One program owns BLOCK_M query rows of one (batch row b, query head h) and runs the FlashAttention
online softmax (base 2, log2(e) folded into the scale) over two key segments:

1. the prefix (T, Hkv, P, D): row b reads prefix t = prefix_index[b] (bank), b (per row, T == B),
   or 0 (shared: the batch stride is passed as 0, so the one prefix is read by every row and stays
   hot in L2); prefix keys are never masked;
2. the sequence (B, Hkv, Nk, D) with bottom-right causal (query i sees key j iff
   j <= i + Nk - Nq), a key padding mask and a sliding window ((i + Nk - Nq) - j < window).
   Key blocks that causal / window masking leaves empty for the whole row block are skipped by
   the loop bounds, not computed.

Per score: ``s = q.k * scale``, soft-capping ``softcap * tanh(s / softcap)``, then ``+ attn_bias``
(read by its strides: the op hands over an expanded view, never a materialized copy), masking,
softmax, dropout on the probabilities (``dropout.py``), ``@ V``. GQA/MQA map head h to KV head
h // (Hq // Hkv). Outputs: out (B, Hq, Nq, D) in q's dtype (contiguous) and lse (B, Hq, Nq) float32
natural log, -inf for rows that see no key (their output is exactly 0).

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

from ptkernels.backends.triton import configs
from ptkernels.backends.triton._common import INTERPRET, alloc, block_d, mma, strides
from ptkernels.backends.triton.dropout import dropout_keep, seed_from_tensor

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

from ptkernels.backends import DECODE_MAX_NQ, DECODE_MIN_KEYS, is_decode_shape  # noqa: E402,F401


@triton.jit
def _tanh(x):
    # tanh from exp (portable: the interpreter has no libdevice); exact limits at +-inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def attend_segment(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd, lo, hi, n_valid,
                   col0, n_cols, rows, row_ok, bias_base, sbm, sbn, kpm_base, skpm, seed, bh,
                   dropout_p, scale, softcap, window, q_off, D,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_SEQ: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """Online softmax of BLOCK_M query rows over keys [lo, hi) of one segment.

    acc (BLOCK_M, BLOCK_D) fp32 unnormalized output; m_i, l_i (BLOCK_M,) fp32 running max (base 2)
    and sum; q (BLOCK_M, BLOCK_D); k_base/v_base point at key 0 of the segment for this (b, kv
    head); n_valid = keys in the segment (P or Nk); col0 = the segment's first column in
    [0, P + Nk) (bias and dropout columns); rows (BLOCK_M,) query indices, row_ok = rows < Nq;
    bias_base points at bias[b, h, 0, 0] (strides sbm, sbn); q_off = Nk - Nq (bottom-right causal).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_valid
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if INTERPRET:
            kt = kt.to(tl.float32)
        s = mma(q, kt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), INTERPRET)
        if HAS_SOFTCAP:
            s = (softcap * LOG2E) * _tanh(s * (scale / softcap))
        else:
            s = s * (scale * LOG2E)
        if HAS_BIAS:
            bias = tl.load(bias_base + (rows[:, None] * sbm + (col0 + cols)[None, :] * sbn),
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * LOG2E
        valid = col_ok[None, :]
        if IS_SEQ:
            qpos = rows[:, None] + q_off
            if CAUSAL:
                valid = valid & (cols[None, :] <= qpos)
            if HAS_WINDOW:
                valid = valid & (qpos - cols[None, :] < window)
            if HAS_KPM:
                keep_key = tl.load(kpm_base + cols * skpm, mask=col_ok, other=0)
                valid = valid & (keep_key != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf: use 0 as its base so that
        # exp2(-inf - base) = 0 instead of NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_base)
        p = tl.exp2(s - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, bh, rows, col0 + cols, n_cols, dropout_p)
            p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if INTERPRET:
            v = v.to(tl.float32)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def sequence_bounds(m0, Nk, q_off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Sequence keys [lo, hi) that rows [m0, m0 + BLOCK_M) may see (lo a multiple of BLOCK_N)."""
    hi = Nk
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Nk, m0 + BLOCK_M + q_off), 0)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 + q_off - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def start_query_block(Q, sqb, sqh, sqm, sqd, b, h, m0, Nq, D, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """Load the BLOCK_M query rows [m0, m0 + BLOCK_M) of (b, h) and an empty softmax state.

    Returns rows, row_ok, offs_d, d_ok, q, acc (BLOCK_M, BLOCK_D) fp32, m_i = -inf, l_i = 0.
    """
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRET:
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


@triton.jit
def _fwd_kernel(Q, K, V, PK, PV, PIDX, KPM, BIAS, OUT, LSE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                spkt, spkh, spkn, spkd, spvt, spvh, spvn, spvd,
                skpmb, skpmn, sbb, sbh, sbm, sbn, sob, soh, som,
                Hq, Nq, Nk, P, G, D, seed, scale, softcap, dropout_p, window,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_INDEX: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, INTERPRET: tl.constexpr):
    # grid (cdiv(Nq, BLOCK_M), B * Hq)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = (h // G).to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows, row_ok, offs_d, d_ok, q, acc, m_i, l_i = start_query_block(
        Q, sqb, sqh, sqm, sqd, b, h, m0, Nq, D, BLOCK_M, BLOCK_D, INTERPRET)
    bias_base = BIAS + b * sbb + h * sbh
    n_cols = P + Nk
    q_off = Nk - Nq

    if P > 0:
        if HAS_INDEX:
            t = tl.load(PIDX + b).to(tl.int64)
        else:
            t = b  # spkt/spvt are 0 for a prefix shared by the batch
        acc, m_i, l_i = attend_segment(
            acc, m_i, l_i, q, PK + t * spkt + kvh * spkh, PV + t * spvt + kvh * spvh,
            spkn, spkd, spvn, spvd, 0, P, P, 0, n_cols, rows, row_ok, bias_base, sbm, sbn,
            KPM, skpmn, seed, bh, dropout_p, scale, softcap, window, q_off, D,
            BLOCK_N, BLOCK_D, False, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_BIAS, HAS_SOFTCAP,
            HAS_DROPOUT, INTERPRET)
    lo, hi = sequence_bounds(m0, Nk, q_off, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    acc, m_i, l_i = attend_segment(
        acc, m_i, l_i, q, K + b * skb + kvh * skh, V + b * svb + kvh * svh,
        skn, skd, svn, svd, lo, hi, Nk, P, n_cols, rows, row_ok, bias_base, sbm, sbn,
        KPM + b * skpmb, skpmn, seed, bh, dropout_p, scale, softcap, window, q_off, D,
        BLOCK_N, BLOCK_D, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_BIAS, HAS_SOFTCAP,
        HAS_DROPOUT, INTERPRET)

    out, lse = finish_rows(acc, m_i, l_i)
    tl.store(OUT + b * sob + h * soh + rows[:, None] * som + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

class Launch:
    """Normalized pointers, strides and flags of one call, shared by the main and decode paths."""

    def __init__(self, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                 dropout_seed, causal, window, softcap, scale, dropout_p):
        self.b, self.hq, self.nq, self.d = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        self.p = 0 if prefix_k is None else prefix_k.shape[2]
        self.block_d = block_d(self.d)
        dummy = q
        pk = prefix_k if self.p else dummy
        pv = prefix_v if self.p else dummy
        spk = list(strides(prefix_k if self.p else None, 4))
        spv = list(strides(prefix_v if self.p else None, 4))
        if self.p and prefix_index is None and prefix_k.shape[0] == 1:
            spk[0] = spv[0] = 0  # shared prefix: every batch row reads prefix 0
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
        self.tensors = (q, k, v, pk, pv, prefix_index if prefix_index is not None else dummy,
                        kpm if kpm is not None else dummy,
                        attn_bias if attn_bias is not None else dummy)
        self.strides = (*q.stride(), *k.stride(), *v.stride(), *spk, *spv,
                        *strides(kpm, 2), *strides(attn_bias, 4))
        self.seed = seed_from_tensor(dropout_seed) if dropout_p > 0 else 0
        self.scalars = (self.hq, self.nq, self.nk, self.p, self.hq // self.hkv, self.d,
                        self.seed, float(scale), float(softcap) if softcap > 0 else 1.0,
                        float(dropout_p), int(window) if window > 0 else 0)
        self.flags = dict(HAS_INDEX=prefix_index is not None and self.p > 0, CAUSAL=bool(causal),
                          HAS_WINDOW=window > 0, HAS_KPM=kpm is not None,
                          HAS_BIAS=attn_bias is not None, HAS_SOFTCAP=softcap > 0,
                          HAS_DROPOUT=dropout_p > 0, INTERPRET=INTERPRET)
        self.dtype, self.device = q.dtype, q.device


_TUNED: dict = {}


def pick_config(kernel: str, launch: Launch, run) -> configs.Config:
    """The configuration for this call: fixed under the interpreter, else timed once per key.

    ``run(cfg)`` launches the kernel with ``cfg`` (it only writes the outputs, so timing it in
    place is harmless).
    """
    if INTERPRET or launch.device.type != "cuda":
        return configs.INTERPRET[kernel]
    major, minor = torch.cuda.get_device_capability(launch.device)
    cands = configs.candidates(kernel, major * 10 + minor, launch.dtype, launch.block_d,
                               is_heavy(launch.flags))
    key = (kernel, major, launch.dtype, launch.block_d, launch.nq > 1024, launch.nk > 1024,
           tuple(sorted(k for k, v in launch.flags.items() if v)))
    if key not in _TUNED:
        if len(cands) == 1:
            _TUNED[key] = cands[0]
        else:
            times = [triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20) for c in cands]
            _TUNED[key] = cands[min(range(len(cands)), key=times.__getitem__)]
    return _TUNED[key]


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
        grid = (triton.cdiv(L.nq, cfg.block_m), L.b * L.hq)
        _fwd_kernel[grid](*L.tensors, out, lse, *L.strides, *out.stride()[:3], *L.scalars,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=L.block_d,
                          **L.flags, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    run(pick_config("fwd", L, run))
    return out, lse


def use_decode(nq: int, p: int, nk: int) -> bool:
    """The dispatch rule: split-K decode for few query rows against many keys."""
    return is_decode_shape(nq, p + nk)


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                         dropout_seed, causal, window, softcap, scale, dropout_p):
    """Backend entry point (signature of ``ptkernels.backends.eager.prefix_attention_fwd``)."""
    p = 0 if prefix_k is None else prefix_k.shape[2]
    if use_decode(q.shape[2], p, k.shape[2]):
        from ptkernels.backends.triton.decode import forward_decode
        return forward_decode(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                              attn_bias, dropout_seed, causal, window, softcap, scale, dropout_p)
    return forward_main(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                        dropout_seed, causal, window, softcap, scale, dropout_p)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/triton_aot.py): every config configs.py may pick, with the
# heaviest feature set (bank prefix, causal, window, padding, bias, softcap, dropout).
# ----------------------------------------------------------------------------------------------

ALL_FEATURES = dict(HAS_INDEX=True, CAUSAL=True, HAS_WINDOW=True, HAS_KPM=True, HAS_BIAS=True,
                    HAS_SOFTCAP=True, HAS_DROPOUT=True, INTERPRET=False)
# Unit strides the JIT specializes to 1 for contiguous inputs (head dim, mask and bias columns).
UNIT_STRIDES = ("sqd", "skd", "svd", "spkd", "spvd", "skpmn", "sbn")
FLOAT_ARGS = ("scale", "softcap", "dropout_p")


LIGHT_FEATURES = dict(ALL_FEATURES, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_DROPOUT=False)


def is_heavy(flags: dict) -> bool:
    """Calls with a bias, soft-capping or dropout use the smaller "heavy" tiles (configs.py)."""
    return bool(flags["HAS_BIAS"] or flags["HAS_SOFTCAP"] or flags["HAS_DROPOUT"])


def aot_variants(kernel, kernel_kind: str, arch: int, extra_ptrs=None) -> list[dict]:
    """AOT compile variants (format: tests/triton_aot.py) of a forward kernel: every candidate of
    configs.py for sm_<arch>, compiled with the heaviest feature set its table serves."""
    from ptkernels.backends.triton._common import aot_signature

    out, seen = [], set()
    for dtype in configs.DTYPES:
        dt = configs.aot_dtype(dtype)
        ptrs = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "PK": f"*{dt}", "PV": f"*{dt}",
                "PIDX": "*i64", "KPM": "*u8", "BIAS": "*fp32", "OUT": f"*{dt}", "LSE": "*fp32",
                **(extra_ptrs or {})}
        for bd in configs.HEAD_DIM_BUCKETS:
            for heavy in (True, False):
                for cfg in configs.candidates(kernel_kind, arch, dtype, bd, heavy):
                    # a light call's config that the heavy table also holds is covered by the
                    # heavier compile
                    if (dt, bd, cfg) in seen:
                        continue
                    seen.add((dt, bd, cfg))
                    feats = ALL_FEATURES if heavy else LIGHT_FEATURES
                    cx = dict(feats, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd,
                              **{s: 1 for s in UNIT_STRIDES})
                    cx = {k: v for k, v in cx.items() if k in kernel.arg_names}
                    sig = aot_signature(kernel, ptrs, FLOAT_ARGS, cx)
                    div16 = [a for a in sig if a in ptrs or (a.startswith("s") and sig[a] == "i32"
                                                             and a != "seed")]
                    out.append({"label": f"{dt} d{bd} {'all-features' if heavy else 'no-bias/cap/drop'}",
                                "config": str(cfg), "heavy": heavy, "dtype": dt, "block_d": bd,
                                "signature": sig, "constexprs": cx, "div16": div16,
                                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                "tensor_cores": True})
    return out


AOT_SPECS = [{"name": "attention_fwd", "kernel": _fwd_kernel,
              "description": "fused prefix + sequence attention forward (main path)",
              "variants": lambda arch: aot_variants(_fwd_kernel, "fwd", arch)}]
