"""Dropout keep-mask of the Triton attention kernels (forward and backward share it).

The mask is a pure function of (seed, b, h, i, col0, j), so the backward regenerates exactly
the mask the forward drew, tile by tile, without storing it. One Philox call (10 rounds, four
32-bit outputs) serves four consecutive keys of a segment (the prefix, or the sequence keys):

    r0, r1, r2, r3 = philox(key = seed, c0 = j // 4, c1 = i, c2 = col0, c3 = b * Hq + h)
    keep(b, h, i, col0 + j) = r_(j % 4) >= floor(p * 2^32)     (unsigned)

for query row i and key j within its segment, whose first score column is col0 (0 for the
prefix keys, P for the sequence keys: column P + j; without a prefix both are 0, no clash), with
``seed = int(dropout_seed[0]) % 2**31`` (``seed_from_tensor``): each key is kept with
probability 1 - p (to 2^-32). The four outputs of one call are independent draws. Every tile of
keys starts at a multiple of its block (at least 16) within its segment, so its groups of four
never straddle a tile; the counters are the indices themselves, so nothing wraps below 2^32 rows
or keys (the earlier flat int32 offset i * (P + Nk) + j wrapped, and repeated the mask, past
2^32 scores in a head). A quarter of the Philox calls of one per score, for a layout change: the
four outputs are interleaved into the tile by ``join`` + ``reshape`` (a shared-memory round trip
of an int8 tile: 4-16 KB more shared memory and up to ~50 more registers in the forward, which
is why some heavy backward tables run 8 warps, attention_bwd.py). Kept probabilities are scaled
by 1 / (1 - p) by the caller.

``dropout_keep_mask`` writes the same mask as a bool tensor (B, Hq, Nq, P + Nk) so that tests can
hand it to the eager reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptkernels.backends.triton._common import INTERPRET


def seed_from_tensor(dropout_seed: torch.Tensor) -> int:
    """The kernel seed: ``int(dropout_seed[0]) % 2**31`` (a non-negative int32)."""
    return int(dropout_seed.reshape(-1)[0].item()) % (2 ** 31)


@triton.jit
def _keep4(seed, bh, c0, c1, col0, p):
    """The four keep bits (int8) of the key groups c0 (key // 4) and rows c1, broadcast
    together: one Philox call per group. The head goes into a counter, not the key, so the key
    stays the call's one scalar seed also where rows of several heads share a tile (decode)."""
    # the counters broadcast inside Philox: its first rounds run on the (rows, 1) and (1, groups)
    # vectors, the full tile from the third round on
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, col0, bh.to(tl.uint32))
    # floor(p * 2^32) for p in [0, 1), kept below 2^32 where float32 rounds p * 2^32 up to it
    thr = tl.minimum(p * 4294967296.0, 4294967040.0).to(tl.uint32)
    return ((r0 >= thr).to(tl.int8), (r1 >= thr).to(tl.int8), (r2 >= thr).to(tl.int8),
            (r3 >= thr).to(tl.int8))


@triton.jit
def dropout_keep(seed, bh, rows, col0, n0, p, BLOCK_N: tl.constexpr):
    """Bool keep-mask of one (rows x keys) tile.

    seed: int32 scalar (``seed_from_tensor``); bh: b * Hq + h (scalar, or a (BLOCK_M, 1) column
    of per-row heads); rows (BLOCK_M,) query indices i; col0: the segment's first score column
    (0 for prefix keys, P for sequence keys); n0: the tile's first key within its segment (a
    multiple of 4); p: drop rate. Returns (BLOCK_M, BLOCK_N) bool, True = keep, for the keys
    n0 + [0, BLOCK_N) of the segment.
    """
    tl.static_assert(BLOCK_N % 4 == 0, "dropout tiles hold whole groups of 4 keys")
    groups = n0 // 4 + tl.arange(0, BLOCK_N // 4)
    k0, k1, k2, k3 = _keep4(seed, bh, groups[None, :], rows[:, None], col0, p)
    # (M, N/4, 2, 2)[m, g, x, y] = k_(2x + y)[m, g] -> key 4g + 2x + y
    keep = tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), (rows.shape[0], BLOCK_N))
    return keep != 0


@triton.jit
def dropout_keep_t(seed, bh, rows, col0, n0, p, BLOCK_N: tl.constexpr):
    """``dropout_keep`` laid out (keys, rows) for a (keys x queries) tile of the backward: the
    transpose of its tile. (Drawing in the (keys, rows) layout and interleaving along the keys
    there cost the dK/dV and prefix kernels more registers and spills: AOT check.)"""
    return tl.trans(dropout_keep(seed, bh, rows, col0, n0, p, BLOCK_N))


@triton.jit
def _keep_mask_kernel(out_ptr, seed, Hq, Nq, P, n_cols, p, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    # grid (B * Hq * cdiv(Nq, BLOCK_M), cdiv(P, BLOCK_N) + cdiv(n_cols - P, BLOCK_N)): (b, h)
    # folded into axis 0 (no 65,535 limit), the prefix tiles then the sequence tiles on axis 1;
    # out is (B * Hq, Nq, n_cols) int8.
    n_mb = tl.cdiv(Nq, BLOCK_M)
    pid_m = tl.program_id(0) % n_mb
    bh = tl.program_id(0) // n_mb
    pid_n = tl.program_id(1)
    n_pb = tl.cdiv(P, BLOCK_N)
    seg = (pid_n >= n_pb).to(tl.int32)
    n0 = (pid_n - seg * n_pb) * BLOCK_N
    col0 = seg * P
    seg_len = P + seg * (n_cols - 2 * P)   # P for the prefix, Nk for the sequence
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = n0 + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, bh, rows, col0, n0, p, BLOCK_N)
    # int64: rows * n_cols passes 2^31 for a head of Nq * (P + Nk) > 2^31 mask elements
    ptrs = out_ptr + (bh.to(tl.int64) * Nq + rows[:, None]) * n_cols + (col0 + keys)[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < Nq) & (keys[None, :] < seg_len))


def dropout_keep_mask(seed_tensor: torch.Tensor, shape, p: float, device=None, *,
                      prefix_len: int) -> torch.Tensor:
    """The keep-mask the Triton kernels use, as bool (B, Hq, Nq, P + Nk) on ``device``, with
    ``prefix_len`` = P (the first P columns are the prefix segment's keys).

    ``device`` defaults to the CPU under the interpreter and to the current CUDA device otherwise.
    """
    b, hq, nq, n_cols = (int(s) for s in shape)
    prefix_len = int(prefix_len)
    if not 0 <= prefix_len <= n_cols:
        raise ValueError(f"prefix_len must be in [0, {n_cols}] (shape[-1]), got {prefix_len}")
    if device is None:
        device = "cpu" if INTERPRET else "cuda"
    out = torch.empty((b, hq, nq, n_cols), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.bool()
    block_m, block_n = 16, 64
    n_tiles = triton.cdiv(prefix_len, block_n) + triton.cdiv(n_cols - prefix_len, block_n)
    grid = (b * hq * triton.cdiv(nq, block_m), n_tiles)
    _keep_mask_kernel[grid](out, seed_from_tensor(seed_tensor), hq, nq, prefix_len, n_cols,
                            float(p), BLOCK_M=block_m, BLOCK_N=block_n)
    return out.bool()


def _mask_variants(arch: int) -> list[dict]:
    from ptkernels.backends.triton._common import aot_signature

    cx = {"BLOCK_M": 16, "BLOCK_N": 64}
    sig = aot_signature(_keep_mask_kernel, {"out_ptr": "*i8"}, ("p",), cx)
    return [{"label": "int8 mask", "config": "16x64 w4 s1", "signature": sig, "constexprs": cx,
             "div16": ["out_ptr", "Nq", "n_cols"], "num_warps": 4, "num_stages": 1, "tensor_cores": False}]


AOT_SPECS = [{"name": "dropout_mask", "kernel": _keep_mask_kernel,
              "description": "writes the dropout keep-mask the attention kernels draw",
              "variants": _mask_variants}]
