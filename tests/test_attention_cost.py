"""benchmarks/attention_cost.py: the FLOP and byte counts the microbenchmark divides by. Checked
against brute force (the eager reference's own mask), so a TFLOP/s figure on a GPU is honest."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ac():
    spec = importlib.util.spec_from_file_location(
        "attention_cost", os.path.join(ROOT, "benchmarks", "attention_cost.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("attention_cost", mod)  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def _mask(kw) -> torch.Tensor:
    """(Nq, Nk) bool: the sequence keys each query sees, from the eager reference."""
    from ptkernels.backends.eager import visible_sequence_keys

    vis = visible_sequence_keys(1, kw["nq"], kw["nk"], kw["causal"], kw["window"], None, "cpu")
    return torch.ones(kw["nq"], kw["nk"], dtype=torch.bool) if vis is None else vis[0, 0]


SHAPES = [dict(nq=37, nk=53, causal=True, window=0), dict(nq=53, nk=37, causal=True, window=0),
          dict(nq=64, nk=64, causal=True, window=9), dict(nq=21, nk=33, causal=False, window=0)]


@pytest.mark.parametrize("kw", SHAPES, ids=str)
def test_sequence_pairs_match_the_mask(ac, kw):
    """Visible (query, sequence key) pairs = the reference's mask (bottom-right causal, window)."""
    s = ac.Shape(1, 1, 1, kw["nq"], kw["nk"], 5, 64, causal=kw["causal"], window=kw["window"])
    mask = _mask(kw)
    assert ac.sequence_pairs(s) == int(mask.sum())


@pytest.mark.parametrize("kw", SHAPES, ids=str)
def test_visited_tiles_cover_every_visible_pair(ac, kw):
    """The tiles the kernels loop over hold every visible pair and skip whole invisible blocks."""
    s = ac.Shape(1, 1, 1, kw["nq"], kw["nk"], 5, 64, causal=kw["causal"], window=kw["window"])
    mask = _mask(kw)
    bm = bn = 16
    needed = sum(bool(mask[m:m + bm, n:n + bn].any())
                 for m in range(0, kw["nq"], bm) for n in range(0, kw["nk"], bn))
    assert needed <= ac.visited_sequence_tiles(s, bm, bn) <= needed + -(-kw["nq"] // bm)


def test_backward_products(ac):
    """Useful: 5 products per pair for any exact backward; executed: 5 per sequence pair fused,
    7 separate, 7 per prefix pair (dQ 3 + dprefix 4); prompt-only: 4 per prefix pair."""
    s = ac.Shape(2, 4, 2, 128, 128, 64, 64, causal=False)
    seq, pre, heads = 128 * 128, 128 * 64, 8
    full = ac.cost(s, "bwd", 64, 64)
    assert full["useful"] == 2 * 64 * 5 * (seq + pre) * heads
    assert full["executed"] == 2 * 64 * (5 * seq + 7 * pre) * heads  # whole tiles: no padding
    assert ac.cost(s, "bwd", 64, 64, fused=False)["executed"] == 2 * 64 * 7 * (seq + pre) * heads
    assert ac.cost(s, "bwd_prompt", 64, 64)["useful"] == 2 * 64 * 4 * pre * heads
    fwd = ac.cost(s, "fwd", 64, 64)
    assert fwd["useful"] == 4 * 64 * (seq + pre) * heads
    # the fused path's float32 accumulator: written (zero-filled) and read once
    extra = full["bytes"] - ac.cost(s, "bwd", 64, 64, fused=False)["bytes"]
    assert extra == 2 * 2 * 4 * 128 * 64 * 4
