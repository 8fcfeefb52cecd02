"""Which (query row, key) pairs of a tile are visible, and which tiles need no mask at all: the
visibility math of the forward (``attention_fwd_blocks.py``) and the backward
(``attention_bwd.py``), in one place so the two cannot disagree.

Conventions: query row i, key j of a segment (the prefix, or the sequence whose keys are
bottom-right aligned with the queries: q_off = Nk - Nq). Sequence keys are visible to row i iff
j <= i + q_off (causal) and (i + q_off) - j < window (window); prefix keys are visible to every
row. A key past its segment's length (the tail of the last block) is visible to no row. The key
padding mask is not here: no bound expresses it, so the kernels apply it to every block.

Peeling (FlashAttention-2's split of the loop): a tile whose every pair is visible is
*interior* and skips the (rows x keys) compares and the select; the others (the causal
diagonal band, the window edge band, the key tail) are masked to -inf. Query rows past Nq need
no mask in either direction: the kernels load them as zeros with lse = +inf, so their
probabilities are exactly 0.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
def query_bounds(n0, Nq, q_off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The key-side twin of ``sequence_bounds``: query rows [lo, hi) that may see a sequence key
    of [n0, n0 + BLOCK_N) (lo a multiple of BLOCK_M)."""
    lo = 0
    if CAUSAL:
        lo = tl.maximum(n0 - q_off, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    hi = Nq
    if HAS_WINDOW:
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + window - q_off)
    return lo, hi


@triton.jit
def mask_scores(s, cols, col_ok, rows, q_off, window, IS_SEQ: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """Scores with -inf at the tail keys (col_ok False) and, in the sequence, at the keys the
    causal diagonal or the window hides from a row. s is (BLOCK_M, BLOCK_N), or with KEYS_FIRST
    (BLOCK_N, BLOCK_M) (the backward's dK/dV tiles); cols (BLOCK_N,), rows (BLOCK_M,)."""
    if KEYS_FIRST:
        c = cols[:, None]
        r = rows[None, :]
        valid = col_ok[:, None]
    else:
        c = cols[None, :]
        r = rows[:, None]
        valid = col_ok[None, :]
    if IS_SEQ:
        qpos = r + q_off
        if CAUSAL:
            valid = valid & (c <= qpos)
        if HAS_WINDOW:
            valid = valid & (qpos - c < window)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def interior_bounds(lo, hi, m0, Nk, q_off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The interior [ilo, ihi) of the sequence keys [lo, hi) (``sequence_bounds``) of rows
    [m0, m0 + BLOCK_M): whole key blocks (ilo a multiple of BLOCK_N past lo) that hold no tail
    key (past Nk), lie entirely below the causal diagonal of the block's first row and entirely
    inside the window of its last row, so every row sees every key of them. lo <= ilo <= ihi
    <= hi; [lo, ilo) is the window edge band and [ihi, hi) the diagonal band and the tail, both
    masked."""
    ihi = (Nk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # key j is visible to every row iff j <= m0 + q_off (the first row's diagonal)
        ihi = tl.minimum(ihi, (tl.maximum(m0 + q_off + 1, 0) // BLOCK_N) * BLOCK_N)
    ilo = lo
    if HAS_WINDOW:
        # ... and iff j > (m0 + BLOCK_M - 1 + q_off) - window (the last row's window edge)
        edge = tl.maximum(m0 + BLOCK_M + q_off - window, 0)
        ilo = tl.maximum(ilo, ((edge + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    ilo = tl.minimum(ilo, hi)
    ihi = tl.minimum(tl.maximum(ihi, ilo), hi)
    return ilo, ihi


@triton.jit
def interior_query_start(lo, hi, n0, Nk, q_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr):
    """The key-side twin of ``interior_bounds`` for calls without a window: of the query blocks
    starting at lo, lo + BLOCK_M, ... below hi (``query_bounds``) that can see the sequence keys
    [n0, n0 + BLOCK_N), those starting at ilo or later see every key of the block from every
    row; [lo, ilo) is the causal diagonal band. A block holding a tail key (n0 + BLOCK_N > Nk)
    has no interior (ilo = hi). lo <= ilo <= hi."""
    ilo = lo
    if CAUSAL:
        # row i sees the block's last key iff i >= n0 + BLOCK_N - 1 - q_off; the block's first
        # row decides
        first = tl.maximum(n0 + BLOCK_N - 1 - q_off, 0)
        ilo = tl.maximum(ilo, ((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    if n0 + BLOCK_N > Nk:
        ilo = hi
    return tl.minimum(ilo, hi)
