"""Dropout keep-mask of the Triton attention kernels (forward and backward share it).

The mask is a pure function of (seed, b, h, i, j), so the backward regenerates exactly the mask the
forward drew, tile by tile, without storing it:

    keep(b, h, i, j) = tl.rand(seed + (b * Hq + h), i * (P + Nk) + j) >= p

for query row i and key column j in [0, P + Nk) (prefix columns first, then sequence keys), with
``seed = int(dropout_seed[0]) % 2**31`` (``seed_from_tensor``) and int32 offsets. The per-(b, h)
seed is formed in int64 so it never wraps. The offset i * (P + Nk) + j stays int32 on purpose:
past 2^32 within one head (Nq * (P + Nk) > 2^32, e.g. 64K x 64K) it wraps and repeats earlier
rows' mask (forward and backward still agree). int64 offsets (``tl.rand`` then feeds the high 32
bits to a second Philox counter word; bit-identical below 2^32) cost the backward's
all-features configs, already at 254-255 registers, 12-24 B of spills on sm_80 / sm_90 (AOT
check). Kept probabilities are scaled by 1 / (1 - p) by the caller.

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
def dropout_keep(seed, bh, rows, cols, n_cols, p):
    """Bool keep-mask of one tile.

    seed: int32 scalar (``seed_from_tensor``); bh: b * Hq + h; rows (BLOCK_M,) query indices i;
    cols (BLOCK_N,) key columns j in [0, P + Nk) (prefix first); n_cols = P + Nk; p: drop rate.
    Returns (BLOCK_M, BLOCK_N) bool, True = keep.
    """
    head_seed = bh.to(tl.int64) + seed  # bh is a tensor; seed may arrive as a constexpr
    offsets = rows[:, None] * n_cols + cols[None, :]
    return tl.rand(head_seed, offsets.to(tl.int32)) >= p


@triton.jit
def dropout_keep_t(seed, bh, rows, cols, n_cols, p):
    """``dropout_keep`` laid out (cols, rows) for a (keys x queries) tile of the backward: the same
    formula element by element. Generating it transposed avoids a layout conversion (shared
    memory + registers) of the (rows, cols) mask."""
    head_seed = bh.to(tl.int64) + seed
    offsets = rows[None, :] * n_cols + cols[:, None]
    return tl.rand(head_seed, offsets.to(tl.int32)) >= p


@triton.jit
def _keep_mask_kernel(out_ptr, seed, Hq, Nq, n_cols, p, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    # grid (B * Hq * cdiv(Nq, BLOCK_M), cdiv(n_cols, BLOCK_N)): (b, h) folded into axis 0 (no
    # 65,535 limit); out is (B * Hq, Nq, n_cols) int8.
    n_mb = tl.cdiv(Nq, BLOCK_M)
    pid_m = tl.program_id(0) % n_mb
    bh = tl.program_id(0) // n_mb
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, bh, rows, cols, n_cols, p)
    # int64: rows * n_cols passes 2^31 for a head of Nq * (P + Nk) > 2^31 mask elements
    ptrs = out_ptr + (bh.to(tl.int64) * Nq + rows[:, None]) * n_cols + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < Nq) & (cols[None, :] < n_cols))


def dropout_keep_mask(seed_tensor: torch.Tensor, shape, p: float, device=None) -> torch.Tensor:
    """The keep-mask the Triton kernels use, as bool (B, Hq, Nq, P + Nk) on ``device``.

    ``device`` defaults to the CPU under the interpreter and to the current CUDA device otherwise.
    """
    b, hq, nq, n_cols = (int(s) for s in shape)
    if device is None:
        device = "cpu" if INTERPRET else "cuda"
    out = torch.empty((b, hq, nq, n_cols), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.bool()
    block_m, block_n = 16, 64
    grid = (b * hq * triton.cdiv(nq, block_m), triton.cdiv(n_cols, block_n))
    _keep_mask_kernel[grid](out, seed_from_tensor(seed_tensor), hq, nq, n_cols, float(p),
                            BLOCK_M=block_m, BLOCK_N=block_n)
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
