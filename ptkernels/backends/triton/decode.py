"""Split-K decode forward of ``prefix_attention``: few query rows (generation with a KV cache).

With Nq <= 16 the main kernel would run one program per (b, h) and leave most of the GPU idle
while each program walks P + Nk keys alone. Here the keys are split over programs instead
(FlashDecoding / FlashInfer cascade style): the prefix and the sequence (the cache) are separate
segments, each cut into chunks of ``chunk`` keys; program (s, b*Hkv, r) computes a partial softmax
over chunk s and writes a float32 partial output (normalized) and its natural-log lse to workspaces
(B*Hq, S, Nq, D) / (B*Hq, S, Nq). A combine kernel merges the S partials by logsumexp:
lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) * out_s. Chunks that causal / window
masking empties give lse_s = -inf and weight 0.

GQA packing: decode is memory bound (each key is used by only G * Nq query rows), so the G = Hq /
Hkv query heads that share a KV head are packed into one program's rows: packed row
r in [0, G * Nq) is query head h = kvh * G + r // Nq, query row m = r % Nq. Each K/V tile is then
loaded once per KV head (per block of BLOCK_M packed rows) instead of once per query head; every
row keeps its own causal / window offset, bias row, dropout stream and workspace slot. MHA (G = 1)
is the degenerate case r = m. BLOCK_M is the smallest row block of the table that holds all G * Nq
packed rows (``configs.decode_candidates``: 16, else 64 or 32, or 128 without bias, softcap and
dropout), so K/V are read once per KV head.

Semantics are those of ``attention_fwd`` (same score pipeline, same dropout mask since the mask is
a function of (b, h, m, column) only), so the normal backward applies to a decode-path forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptkernels.backends.triton._common import (INTERPRET, aot_signature, alloc, cast_rounded,
                                              prefix_of_row)
from ptkernels.backends.triton.attention_fwd_blocks import (DIV16_INTS, Launch, aot_variants,
                                                            attend_blocks, finish_rows,
                                                            launch_with_config)

# Keys per split: enough to amortize a program's setup, small enough to spread a 4k cache over
# a few dozen programs per (b, kv head).
MIN_CHUNK = 256


@triton.jit
def packed_rows(r0, Nq, G, BLOCK_M: tl.constexpr):
    """Packed rows [r0, r0 + BLOCK_M) of one KV head: (row_ok, g, m), each (BLOCK_M,): row valid
    (r < G * Nq), query head within the group (h = kvh * G + g) and query row m."""
    r = r0 + tl.arange(0, BLOCK_M)
    return r < G * Nq, r // Nq, r % Nq


@triton.jit
def packed_sequence_bounds(r0, Nq, G, Nk, q_off, window, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Sequence keys [lo, hi) that some packed row of [r0, r0 + BLOCK_M) may see; lo a multiple of
    BLOCK_N. The block's query rows m are not contiguous (they wrap at each head): a block that
    straddles two heads holds m = Nq - 1 and m = 0, else m runs from r0 % Nq to r_last % Nq.
    Scalar arithmetic (a reduction over the row vector here costs registers in the loop)."""
    r_last = tl.minimum(r0 + BLOCK_M, G * Nq) - 1
    straddles = (r0 // Nq) != (r_last // Nq)
    hi = Nk
    if CAUSAL:
        m_max = tl.where(straddles, Nq - 1, r_last % Nq)
        hi = tl.maximum(tl.minimum(Nk, m_max + 1 + q_off), 0)
    lo = 0
    if HAS_WINDOW:
        m_min = tl.where(straddles, 0, r0 % Nq)
        lo = tl.maximum(m_min + q_off - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pidx_ptr, kpm_ptr, bias_ptr, opart_ptr,
                   lpart_ptr,
                   s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                   s_pkt, s_pkh, s_pkn, s_pkd, s_pvt, s_pvh, s_pvn, s_pvd,
                   s_kpmb, s_kpmn, s_bb, s_bh, s_bm, s_bn,
                   Hq, Nq, Nk, P, G, seed, scale, softcap, dropout_p, window,
                   chunk, n_split_p, n_split,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREFIX_MODE: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   FP32_DOTS: tl.constexpr):
    # grid (n_split * B * Hkv, cdiv(G * Nq, BLOCK_M)): (split, b*kvh) folded into axis 0 (no
    # 65,535 limit on B * Hkv); splits [0, n_split_p) cover the prefix. Axis 1 walks the packed
    # rows of the G query heads of KV head kvh.
    split = tl.program_id(0) % n_split
    bkv = tl.program_id(0) // n_split
    Hkv = Hq // G
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    r0 = tl.program_id(1) * BLOCK_M
    row_ok, g, m = packed_rows(r0, Nq, G, BLOCK_M)
    h = kvh * G + g  # (BLOCK_M,) int64
    bh = b * Hq + h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * s_qb + h[:, None] * s_qh + m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOTS:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bias_rows = bias_ptr + (b * s_bb + h * s_bh + m * s_bm)
    n_cols = P + Nk
    q_off = Nk - Nq
    if split < n_split_p:
        t = prefix_of_row(pidx_ptr, b, PREFIX_MODE)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, P)
        acc, m_i, l_i = attend_blocks(
            acc, m_i, l_i, q, pk_ptr + t * s_pkt + kvh * s_pkh, pv_ptr + t * s_pvt + kvh * s_pvh,
            s_pkn, s_pkd, s_pvn, s_pvd, lo, hi, lo, lo, hi, 0, n_cols, m, row_ok, bias_rows, s_bn,
            kpm_ptr, s_kpmn, seed, bh[:, None], dropout_p, scale, softcap, window, q_off, D,
            BLOCK_N, BLOCK_D, False, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_BIAS, HAS_SOFTCAP,
            HAS_DROPOUT, FP32_DOTS, False)
    else:
        lo_c = (split - n_split_p) * chunk
        hi_c = tl.minimum(lo_c + chunk, Nk)
        lo_v, hi_v = packed_sequence_bounds(r0, Nq, G, Nk, q_off, window, BLOCK_M, BLOCK_N,
                                            CAUSAL, HAS_WINDOW)
        # chunk is a multiple of BLOCK_N, so lo stays block aligned
        lo = tl.maximum(lo_c, lo_v)
        hi = tl.minimum(hi_c, hi_v)
        acc, m_i, l_i = attend_blocks(
            acc, m_i, l_i, q, k_ptr + b * s_kb + kvh * s_kh, v_ptr + b * s_vb + kvh * s_vh,
            s_kn, s_kd, s_vn, s_vd, lo, hi, lo, lo, hi_c, P, n_cols, m, row_ok, bias_rows, s_bn,
            kpm_ptr + b * s_kpmb, s_kpmn, seed, bh[:, None], dropout_p, scale, softcap, window,
            q_off, D, BLOCK_N, BLOCK_D, True, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_BIAS, HAS_SOFTCAP,
            HAS_DROPOUT, FP32_DOTS, False)
    out, lse = finish_rows(acc, m_i, l_i)
    # workspace slot of (b, h, split, m): the layout the combine kernel reads, as without packing
    part = (bh * n_split + split) * Nq + m
    tl.store(opart_ptr + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
    tl.store(lpart_ptr + part, lse, mask=row_ok)


@triton.jit
def _combine_kernel(opart_ptr, lpart_ptr, out_ptr, lse_ptr, Hq, Nq, n_split, s_ob, s_oh, s_om,
                    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                    FP32_DOTS: tl.constexpr):
    # grid (Nq * B * Hq,): merge the n_split partials of one query row by logsumexp.
    i = tl.program_id(0) % Nq
    bh = tl.program_id(0) // Nq
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_split
    part = (bh.to(tl.int64) * n_split + offs_s) * Nq + i
    lse_s = tl.load(lpart_ptr + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_base = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_base)
    total = tl.sum(w, 0)
    o = tl.load(opart_ptr + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None],
                other=0.0)
    seen = total > 0.0
    out = tl.sum(o * w[:, None], 0) / tl.where(seen, total, 1.0)
    lse = tl.where(seen, m_base + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    OT: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + b * s_ob + h * s_oh + i * s_om + offs_d,
             cast_rounded(out, OT, FP32_DOTS), mask=offs_d < D)
    tl.store(lse_ptr + bh.to(tl.int64) * Nq + i, lse)


def num_splits(n_keys: int, chunk: int) -> int:
    return triton.cdiv(n_keys, chunk) if n_keys > 0 else 0


def packed_row_blocks(launch: Launch, block_m: int) -> int:
    """Row blocks per (b, kv head): its G * Nq packed query rows in tiles of block_m."""
    return triton.cdiv((launch.hq // launch.hkv) * launch.nq, block_m)


def decode_grid(launch: Launch, block_m: int, n_split: int) -> tuple[int, int]:
    """Grid of ``_decode_kernel``: (n_split * B * Hkv, packed row blocks); one program per KV
    head, not per query head (GQA packing)."""
    return n_split * launch.b * launch.hkv, packed_row_blocks(launch, block_m)


def choose_chunk(launch: Launch, block_m: int, block_n: int) -> int:
    """Keys per split (a multiple of block_n): about 2 programs per SM over the whole grid."""
    if INTERPRET or launch.device.type != "cuda":
        return 2 * block_n  # small chunks so that the tests cross chunk boundaries
    sms = torch.cuda.get_device_properties(launch.device).multi_processor_count
    rows = launch.b * launch.hkv * packed_row_blocks(launch, block_m)
    want = max(1, (2 * sms) // max(1, rows))
    chunk = max(MIN_CHUNK, triton.cdiv(launch.p + launch.nk, want))
    return triton.cdiv(chunk, block_n) * block_n


def forward_decode(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                   dropout_seed, causal, window, softcap, scale, dropout_p):
    """Split-K forward; same signature and results as ``attention_fwd.forward_main``."""
    L = Launch(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
               dropout_seed, causal, window, softcap, scale, dropout_p)
    out = alloc((L.b, L.hq, L.nq, L.d), q.dtype, q.device)
    lse = alloc((L.b, L.hq, L.nq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    def run(cfg):
        chunk = choose_chunk(L, cfg.block_m, cfg.block_n)
        n_split_p = num_splits(L.p, chunk)
        n_split = max(1, n_split_p + num_splits(L.nk, chunk))
        o_part = alloc((L.b * L.hq, n_split, L.nq, L.block_d), torch.float32, q.device)
        l_part = alloc((L.b * L.hq, n_split, L.nq), torch.float32, q.device)
        _decode_kernel[decode_grid(L, cfg.block_m, n_split)](
            *L.tensors, o_part, l_part, *L.strides, *L.scalars, chunk, n_split_p, n_split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=L.block_d, **L.flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _combine_kernel[(L.nq * L.b * L.hq,)](o_part, l_part, out, lse, L.hq, L.nq, n_split,
                                              *out.stride()[:3], D=L.d,
                                              BLOCK_S=triton.next_power_of_2(n_split),
                                              BLOCK_D=L.block_d, FP32_DOTS=INTERPRET)

    launch_with_config("decode", L, run, packed_rows=(L.hq // L.hkv) * L.nq)
    return out, lse


def _combine_variants(arch: int) -> list[dict]:
    # elementwise + reductions only: the widest tile in the two output dtype classes suffices
    out = []
    for dt in ("bf16", "fp32"):
        for bd in (256,):
            cx = {"BLOCK_S": 64, "BLOCK_D": bd, "D": bd, "FP32_DOTS": False}
            ptrs = {"opart_ptr": "*fp32", "lpart_ptr": "*fp32", "out_ptr": f"*{dt}",
                    "lse_ptr": "*fp32"}
            sig = aot_signature(_combine_kernel, ptrs, (), cx)
            out.append({"label": f"{dt} d{bd} 64 splits", "config": "w4 s1", "signature": sig,
                        "constexprs": cx,
                        "div16": list(ptrs) + ["s_ob", "s_oh", "s_om"] + [
                            a for a in DIV16_INTS if a in sig],
                        "num_warps": 4, "num_stages": 1, "tensor_cores": False})
    return out


AOT_SPECS = [
    {"name": "decode_fwd", "kernel": _decode_kernel,
     "description": "split-K decode forward: partial softmax per key chunk",
     "products_per_tile": "2 (QK^T, PV)",
     "variants": lambda arch: aot_variants(_decode_kernel, "decode", arch,
                                           {"opart_ptr": "*fp32", "lpart_ptr": "*fp32"})},
    {"name": "decode_combine", "kernel": _combine_kernel,
     "description": "logsumexp merge of the split-K partials",
     "variants": _combine_variants},
]
