"""Exact work and traffic of one prefix-attention call, from the shapes and the blocks the Triton
kernels visit (used by ``bench_attention.py`` to report TFLOP/s and GB/s against the hardware peak,
and by the prompt-only backward's saved-work line).

Matrix-product FLOPs (2 per multiply-add), per (batch row, query head):

* forward: 2 products (Q K^T, P V) per visible (query, key) pair: 4 D per pair;
* full backward, fused (the default of calls without bias or softcap; with dropout only in
  16-bit at D <= 128: ``attention_bwd.fused_tiles``): dK/dV kernel 5
  products (S, dP, P^T dO, dS^T Q, dS K) over the sequence pairs, dQ kernel 3 (S, dP, dS K) and
  prefix kernel 4 over the prefix pairs: 2 D (5 S + 7 R) for S sequence pairs and R = Nq P prefix
  pairs; separate (bias, softcap, larger-D dropout or deterministic calls): the dQ kernel also
  over the sequence pairs,
  2 D (7 S + 7 R);
* prompt-only backward (q, k, v frozen): only the prefix kernel: 2 D 4 R.

``useful`` counts the visible pairs only, with the least number of products an exact method needs
(forward 2, backward 5 per pair, as FlashAttention counts; the same for every provider, so that
TFLOP/s compare); ``executed`` counts this package's products over whole tiles of the blocks the
kernels loop over (causal / window block skipping included, the masked part of a boundary tile
counted), which is what the hardware runs. Bytes are the compulsory HBM traffic (every input read once,
every output written once); the kernels re-read K/V per query block, mostly from L2.
"""
from __future__ import annotations

from dataclasses import dataclass

# Dense tensor-core peak (TFLOP/s, 16-bit inputs, fp32 accumulation) and HBM bandwidth (GB/s) by
# device name fragment, from the vendors' data sheets (no sparsity).
PEAKS = {"H200": (989.0, 4800.0), "H100 SXM": (989.0, 3350.0), "H100 PCIe": (756.0, 2000.0),
         "H100": (989.0, 3350.0), "A100-SXM4-80GB": (312.0, 2039.0), "A100": (312.0, 1555.0),
         "L40S": (362.0, 864.0), "L4": (121.0, 300.0), "A10": (125.0, 600.0),
         "RTX 4090": (165.0, 1008.0), "RTX 3090": (71.0, 936.0)}


def device_peak(name: str):
    """(TFLOP/s, GB/s) of a CUDA device name, or None when unknown."""
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None


@dataclass(frozen=True)
class Shape:
    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    p: int
    d: int
    causal: bool = True
    window: int = 0
    elem_bytes: int = 2
    shared_prefix: bool = True   # one prefix for the batch (T = 1), else one per row (T = B)


def visible_keys(s: Shape, i: int) -> int:
    """Sequence keys query row i sees (bottom-right causal, sliding window)."""
    hi = min(s.nk, i + s.nk - s.nq + 1) if s.causal else s.nk
    lo = max(0, i + s.nk - s.nq - s.window + 1) if s.window > 0 else 0
    return max(0, hi - lo)


def sequence_pairs(s: Shape) -> int:
    return sum(visible_keys(s, i) for i in range(s.nq))


def visited_sequence_tiles(s: Shape, block_m: int, block_n: int) -> int:
    """Sequence key tiles the forward / dQ kernels visit over all query blocks (loop bounds of
    ``sequence_bounds``)."""
    tiles, off = 0, s.nk - s.nq
    for m0 in range(0, s.nq, block_m):
        hi = max(min(s.nk, m0 + block_m + off), 0) if s.causal else s.nk
        lo = max(m0 + off - s.window + 1, 0) // block_n * block_n if s.window > 0 else 0
        tiles += max(0, -(-(hi - lo) // block_n)) if hi > lo else 0
    return tiles


def cost(s: Shape, mode: str, block_m: int = 128, block_n: int = 64, fused: bool = True) -> dict:
    """FLOPs (useful, executed) and compulsory bytes of one call; mode "fwd", "bwd" (full),
    "bwd_prompt" (prefix gradients only) or "fwd+bwd"; ``fused``: the backward's sequence dQ is
    fused into the dK/dV kernel (``attention_bwd.uses_fused_dq``)."""
    heads = s.b * s.hq
    seq = sequence_pairs(s)
    pre = s.nq * s.p
    n_mb = -(-s.nq // block_m)
    seq_exec = visited_sequence_tiles(s, block_m, block_n) * block_m * block_n
    pre_exec = n_mb * -(-s.p // block_n) * block_m * block_n
    e = s.elem_bytes
    t = 1 if s.shared_prefix else s.b
    q_bytes = s.b * s.hq * s.nq * s.d * e
    kv_bytes = 2 * s.b * s.hkv * s.nk * s.d * e
    prefix_bytes = 2 * t * s.hkv * s.p * s.d * e
    lse_bytes = s.b * s.hq * s.nq * 4
    fwd = {"useful": 4 * s.d * (seq + pre) * heads, "executed": 4 * s.d * (seq_exec + pre_exec) * heads,
           "bytes": q_bytes + kv_bytes + prefix_bytes + q_bytes + lse_bytes}
    # backward: reads q, k, v, prefix, out, dout, lse; writes dq, dk, dv, dprefix (+ delta)
    # (fused: plus the float32 dQ accumulator, zero-filled and read once; its atomic adds are
    # counted as L2 traffic, not here)
    seq_products = 5 if fused else 7
    acc_bytes = 2 * s.b * s.hq * s.nq * s.d * 4 if fused else 0
    # useful: FlashAttention-2's count (5 products per visible pair, the least any exact
    # backward computes), the same for every provider; executed: what these kernels run
    bwd = {"useful": 2 * s.d * 5 * (seq + pre) * heads,
           "executed": 2 * s.d * (seq_products * seq_exec + 7 * pre_exec) * heads,
           "bytes": 3 * q_bytes + kv_bytes + prefix_bytes + 2 * lse_bytes
           + q_bytes + kv_bytes + prefix_bytes + acc_bytes}
    # prompt-only backward: reads q, out, dout, lse (delta is computed in the prefix kernel) and
    # the prefix; writes dprefix (the float32 per-chunk partials are not counted: they scale
    # with B * chunks * P * D, small next to the query-side reads)
    prompt = {"useful": 2 * s.d * 4 * pre * heads, "executed": 2 * s.d * 4 * pre_exec * heads,
              "bytes": 3 * q_bytes + prefix_bytes + lse_bytes + prefix_bytes}
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "bwd_prompt":
        return prompt
    if mode == "fwd+bwd":
        return {k: fwd[k] + bwd[k] for k in fwd}
    raise ValueError(f"mode must be fwd, bwd, bwd_prompt or fwd+bwd, got {mode!r}")


def prompt_only_saving(s: Shape) -> str:
    """One line: the work the prompt-only backward skips compared with the full backward."""
    full, prompt = cost(s, "bwd"), cost(s, "bwd_prompt")
    return (f"prompt-only backward: {prompt['useful'] / 1e9:.3g} GFLOP instead of "
            f"{full['useful'] / 1e9:.3g} ({100 * (1 - prompt['useful'] / full['useful']):.1f}% of the "
            f"products saved), {prompt['bytes'] / 1e6:.4g} MB instead of {full['bytes'] / 1e6:.4g} MB "
            f"of compulsory traffic")
