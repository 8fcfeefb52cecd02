"""Triton backward of prefix_attention (dQ, dK/dV, dprefix, prompt-only backward).

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Accuracy is judged with DESIGN.md's rule (3x the eager-in-same-dtype error + atol against the
float64 reference's autograd): end to end through ``ptkernels.prefix_attention(backend="triton")``
(``check_against_reference``), and with the backward driven directly (``check_bwd``: ``out, lse``
from the eager forward) where a test needs a partial ``output_mask`` or a different tiling.
Gradient outputs are poisoned with NaN before each run (PTKERNELS_DEBUG_POISON=1).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from attention_cases import (ATOL, BWD_FACTOR, CORE_CASES, Case, cast, check_against_reference,
                             make_inputs, max_err, run_reference)
import ptkernels
from ptkernels.backends import eager

op = importlib.import_module("ptkernels.ops.prefix_attention")

pytest.importorskip("numpy")  # the interpreter needs it
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
tbwd = pytest.importorskip("ptkernels.backends.triton.attention_bwd")
from ptkernels.backends.triton import masks  # noqa: E402
from ptkernels.backends.triton.dropout import dropout_keep_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRADS = ("q", "k", "v", "prefix_k", "prefix_v")


def normalized(inputs: dict, case: Case, device=DEVICE) -> dict:
    """The op-level normalized arguments (ptkernels/ops/prefix_attention.py) of ``inputs``."""
    q, k = inputs["q"], inputs["k"]
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    pk, pv, pidx = op._check_prefix(inputs.get("prefix_k"), inputs.get("prefix_v"),
                                    inputs.get("prefix_index"), b, hkv, d, q)
    p_len = 0 if pk is None else pk.shape[2]
    mask = op._check_mask(inputs.get("attention_mask"), b, nk, q)
    bias = inputs.get("attn_bias")
    bias = None if bias is None else bias.expand(b, hq, nq, p_len + nk)

    def dev(x):
        return None if x is None else x.detach().to(device)

    return dict(q=dev(q), k=dev(k), v=dev(inputs["v"]), prefix_k=dev(pk), prefix_v=dev(pv),
                prefix_index=dev(pidx), key_padding_mask=dev(mask), attn_bias=dev(bias),
                causal=case.causal, window=case.window or -1, softcap=case.softcap or 0.0,
                scale=d ** -0.5, dropout_p=0.0, dropout_seed=None)


def run_bwd(fn, args: dict, grad_out, grad_lse, out, lse, output_mask):
    return fn(grad_out, grad_lse, args["q"], args["k"], args["v"], args["prefix_k"],
              args["prefix_v"], args["prefix_index"], args["key_padding_mask"], args["attn_bias"],
              args["dropout_seed"], out, lse, args["causal"], args["window"], args["softcap"],
              args["scale"], args["dropout_p"], list(output_mask))


def eager_forward(args: dict):
    return eager.prefix_attention_fwd(
        args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"], args["prefix_index"],
        args["key_padding_mask"], args["attn_bias"], args["dropout_seed"], args["causal"],
        args["window"], args["softcap"], args["scale"], args["dropout_p"])


def _reference_grads(inputs, case, grad_out, grad_lse):
    out, lse = run_reference(inputs, case)
    loss = (out.double() * grad_out).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse.double(), 0) * grad_lse).sum()
    names = [n for n in GRADS if n in inputs]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(inputs[n])) for n, g in zip(names, grads)}


def check_bwd(case: Case, dtype, seed=0, use_lse_grad=False, output_mask=(True,) * 5):
    """Triton backward (driven by the eager forward's out/lse) vs the float64 reference."""
    base = make_inputs(case, seed=seed)
    args = normalized(cast(base, dtype), case)
    out, lse = eager_forward(args)
    gen = torch.Generator().manual_seed(99)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64) if use_lse_grad else None
    grads = run_bwd(tbwd.prefix_attention_bwd, args, grad_out.to(DEVICE, dtype),
                    None if grad_lse is None else grad_lse.to(DEVICE, torch.float32), out, lse,
                    output_mask)
    g_x = _reference_grads(cast(base, torch.float64), case, grad_out, grad_lse)
    g_l = _reference_grads(cast(base, dtype), case, grad_out, grad_lse)
    errors = {}
    for name, g, need in zip(GRADS, grads, output_mask):
        if name not in g_x:
            assert g.numel() == 0
            continue
        if not need:
            assert g.numel() == 0, f"d{name} was not requested but computed"
            continue
        if g.dim() == g_x[name].dim() + 1:  # a shared prefix is normalized to (1, Hkv, P, D)
            g = g.squeeze(0)
        assert g.dtype == dtype and g.shape == g_x[name].shape, name
        assert not torch.isnan(g).any(), f"NaN in d{name}"
        e_k, e_l = max_err(g.cpu(), g_x[name]), max_err(g_l[name], g_x[name])
        atol = ATOL[dtype] * max(1.0, g_x[name].abs().max().item())
        errors["d" + name] = (e_k, e_l)
        assert e_k <= BWD_FACTOR * e_l + atol, \
            f"d{name}: error {e_k:.3g} > {BWD_FACTOR} x {e_l:.3g} + {atol:.3g}"
    return errors


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("PTKERNELS_DEBUG_POISON", "1")




# ----------------------------------------------------------------------------------------------
# Accuracy against the float64 reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CORE_CASES, ids=Case.id)
def test_core_cases_float32(case):
    check_against_reference(case, torch.float32, backend="triton", device=DEVICE, seed=11)


LOWP_CASES = [CORE_CASES[i] for i in (2, 4, 8, 9, 10, 11, 15, 19, 23)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=Case.id)
def test_core_cases_low_precision(case, dtype):
    check_against_reference(case, dtype, backend="triton", device=DEVICE, seed=12)


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
def test_head_dims(d):
    case = Case(nq=19, nk=27, p=7, d=d, causal=True, padding="left", hq=2, hkv=1)
    check_against_reference(case, torch.float16 if d in (80, 256) else torch.float32,
                            backend="triton", device=DEVICE, seed=d)


@pytest.mark.parametrize("case", [Case(causal=True, padding="left"), Case(form="bank", p=3),
                                  Case(p=0, form="none", causal=True, nq=9, nk=5)], ids=Case.id)
def test_lse_gradient(case):
    """delta = rowsum(dO * O) - grad_lse: a loss that uses the logsumexp differentiates through it."""
    check_against_reference(case, torch.float32, backend="triton", device=DEVICE, seed=13,
                            use_lse_grad=True)


@pytest.mark.parametrize("case", [Case(dropout_p=0.2), Case(dropout_p=0.3, causal=True, padding="left",
                                                               form="bank", hq=4, hkv=1),
                                  Case(dropout_p=0.1, softcap=4.0, nq=9, nk=17, causal=True,
                                       bias="heads")], ids=Case.id)
def test_dropout_regenerates_forward_mask(case):
    """The backward regenerates the forward's keep-mask tile by tile (dropout.py's formula)."""
    check_against_reference(case, torch.float32, backend="triton", device=DEVICE, seed=14,
                            dropout_mask_fn=dropout_keep_mask)


@pytest.mark.parametrize("output_mask", [(True, False, False, False, False),
                                         (False, True, False, False, False),
                                         (False, False, True, False, True),
                                         (True, False, False, True, False)], ids=str)
def test_partial_output_mask(output_mask):
    """Only the requested gradients are computed (others empty), each still exact."""
    check_bwd(Case(nq=21, nk=25, p=7, causal=True, padding="left", form="bank"), torch.float32,
              output_mask=output_mask)


def test_small_tiles_and_block_skipping(monkeypatch):
    """16x16 tiles: many key/query blocks, so causal/window block skipping is really exercised
    (both backward paths; Nq < Nk and Nq > Nk shift the causal diagonal off the tile grid)."""
    monkeypatch.setattr(tbwd, "INTERPRET_CONFIG", tbwd.Config(16, 16, 4, 1))
    check_bwd(Case(nq=45, nk=70, p=20, causal=True, window=9, padding="right"), torch.float32)
    for det in ("0", "1"):
        monkeypatch.setenv("PTKERNELS_DETERMINISTIC", det)
        check_bwd(Case(nq=45, nk=71, p=3, causal=True, hq=2, hkv=1), torch.float32)
        check_bwd(Case(nq=77, nk=41, p=3, causal=True), torch.float32)
    check_bwd(Case(nq=45, nk=30, p=20, window=7, form="bank", b=3, t=2), torch.float32)


# Masks only on boundary tiles (masks.py, ``peels_masks``: light and dropout-only calls at head
# dims <= 64 without a window). With 16x16 tiles every kind of tile occurs in one call: interior
# tiles (with the padding mask and dropout applied there), the causal diagonal band (Nq < Nk and
# Nq > Nk put it off the tile grid), the key tail (Nk = 75, 35) and the prefix tail (P = 20, 7),
# for the key side (dK/dV, fused dQ) and the query side (the separate dQ kernel:
# PTKERNELS_DETERMINISTIC=1); and the calls that mask every tile (a window, a bias, softcap).
BOUNDARY_CASES = [
    Case(nq=40, nk=75, p=20, causal=True, padding="left", hq=2, hkv=1),
    Case(nq=50, nk=35, p=7, causal=True, form="bank", b=2, t=2),
    Case(nq=40, nk=75, p=20, padding="right"),
    Case(nq=40, nk=75, p=20, causal=True, window=30, hq=2, hkv=1),
    Case(nq=33, nk=64, p=32, causal=True, softcap=4.0, bias="full", padding="right"),
]
TILES_16 = tbwd.Config(16, 16, 4, 1)


def test_peeling_rule():
    assert tbwd.peels_masks("light", 64, False) and tbwd.peels_masks("dropout", 32, False)
    assert not tbwd.peels_masks("light", 128, False)   # the second loop spills there
    assert not tbwd.peels_masks("heavy", 64, False)
    assert not tbwd.peels_masks("light", 64, True)     # a window masks every block


@pytest.mark.parametrize("det", ["0", "1"], ids=["fused", "separate"])
@pytest.mark.parametrize("case", BOUNDARY_CASES, ids=Case.id)
def test_interior_and_boundary_tiles(case, det, monkeypatch):
    monkeypatch.setattr(tbwd, "INTERPRET_CONFIG", TILES_16)
    monkeypatch.setenv("PTKERNELS_DETERMINISTIC", det)
    check_bwd(case, torch.float32)


def test_interior_tiles_with_dropout(monkeypatch):
    monkeypatch.setattr(tbwd, "INTERPRET_CONFIG", TILES_16)
    case = Case(nq=40, nk=75, p=20, dropout_p=0.2, causal=True, padding="left", hq=2, hkv=1)
    check_against_reference(case, torch.float32, backend="triton", device=DEVICE, seed=15,
                            dropout_mask_fn=dropout_keep_mask)


# Interiors one tile (16) too wide: a diagonal-band tile loses its mask.
@triton.jit
def _query_side_early(lo, hi, n0, Nk, q_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr):
    ilo = masks.interior_query_start(lo, hi, n0, Nk, q_off, BLOCK_M, BLOCK_N, CAUSAL)
    return tl.maximum(ilo - 16, lo)


@triton.jit
def _key_side_late(lo, hi, m0, Nk, q_off, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    ilo, ihi = masks.interior_bounds(lo, hi, m0, Nk, q_off, window, BLOCK_M, BLOCK_N, CAUSAL,
                                     HAS_WINDOW)
    return ilo, tl.minimum(ihi + 16, hi)


@pytest.mark.parametrize("name,det,planted", [
    ("interior_query_start", "0", _query_side_early),   # dK/dV (fused dQ)
    ("interior_query_start", "1", _query_side_early),   # dK/dV
    ("interior_bounds", "1", _key_side_late),           # the dQ kernel
], ids=["key-blocks-fused", "key-blocks", "query-blocks"])
def test_planted_interior_off_by_one_tile_is_caught(name, det, planted, monkeypatch):
    """The boundary tests can fail: an interior one tile too wide is reported."""
    monkeypatch.setattr(tbwd, "INTERPRET_CONFIG", TILES_16)
    monkeypatch.setenv("PTKERNELS_DETERMINISTIC", det)
    monkeypatch.setattr(tbwd, name, planted)
    with pytest.raises(AssertionError, match="error"):
        check_bwd(BOUNDARY_CASES[0], torch.float32)


# ----------------------------------------------------------------------------------------------
# Prompt-only backward, prefix-gradient reductions, determinism, layouts
# ----------------------------------------------------------------------------------------------

def _direct_inputs(case: Case, dtype=torch.float32, seed=0):
    """Normalized args + eager out/lse + a fixed upstream gradient, for driving the bwd directly."""
    args = normalized(cast(make_inputs(case, seed=seed), dtype), case)
    out, lse = eager_forward(args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    return args, out, lse, grad_out


@pytest.fixture
def launches(monkeypatch):
    """Names of the kernels launched through attention_bwd._launch (a spy that calls through)."""
    seen = []
    real = tbwd._launch

    def spy(name, kernel, grid, *args, **kwargs):
        seen.append(name)
        return real(name, kernel, grid, *args, **kwargs)

    monkeypatch.setattr(tbwd, "_launch", spy)
    return seen


FUSED = ["preprocess", "dkdv_dq", "dq_prefix", "dprefix", "dprefix_sum"]
SEPARATE = ["preprocess", "dq", "dkdv", "dprefix", "dprefix_sum"]


@pytest.mark.parametrize("case,full_launches",
                         [(Case(nq=21, nk=33, p=7, causal=True, padding="left"), FUSED),
                          (Case(nq=13, nk=19, p=5, form="bank", b=3, t=4, bias="rows"), SEPARATE)],
                         ids=lambda x: x.id() if isinstance(x, Case) else len(x))
def test_prompt_only_backward(case, full_launches, launches):
    """q, k, v frozen: only the prefix kernel and its partial sum run, and the prefix gradients
    equal (bitwise) those of the full backward (fused for a light call, 7-product with a bias)."""
    args, out, lse, grad_out = _direct_inputs(case)
    full = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    assert launches == full_launches
    launches.clear()
    only = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse,
                   [False, False, False, True, True])
    assert launches == ["dprefix", "dprefix_sum"]  # delta is computed inside the prefix kernel
    assert all(g.numel() == 0 for g in only[:3])
    assert torch.equal(only[3], full[3]) and torch.equal(only[4], full[4])


def test_prompt_only_through_the_op(launches):
    """End to end: a frozen q, k, v in prefix_attention launch no sequence-gradient kernel."""
    case = Case(nq=17, nk=23, p=7, causal=True)
    inputs = cast(make_inputs(case, seed=3, grad_for=("prefix_k", "prefix_v")), torch.float32, DEVICE)
    out = ptkernels.prefix_attention(**inputs, causal=True, backend="triton")
    out.square().sum().backward()
    assert [n for n in launches if n != "fwd"] == ["dprefix", "dprefix_sum"]
    assert inputs["prefix_k"].grad is not None and inputs["q"].grad is None


def test_bank_gradients_land_on_chosen_rows_only():
    """Bank: dprefix[t] = sum over rows b with prefix_index[b] == t of that row's gradient; a
    prefix no row chose gets exact zeros."""
    case = Case(nq=11, nk=15, p=6, form="bank", b=4, t=5, causal=True)
    args, out, lse, grad_out = _direct_inputs(case)
    args["prefix_index"] = torch.tensor([2, 0, 2, 4], device=DEVICE)
    out, lse = eager_forward(args)
    bank = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [False] * 3 + [True] * 2)
    per_row = dict(args, prefix_k=args["prefix_k"][args["prefix_index"]],
                   prefix_v=args["prefix_v"][args["prefix_index"]], prefix_index=None)
    rows = run_bwd(tbwd.prefix_attention_bwd, per_row, grad_out, None, out, lse, [False] * 3 + [True] * 2)
    for g_bank, g_rows in zip(bank[3:], rows[3:]):
        assert torch.all(g_bank[[1, 3]] == 0)
        expected = torch.zeros_like(g_bank).index_add_(0, args["prefix_index"], g_rows)
        torch.testing.assert_close(g_bank, expected, rtol=1e-5, atol=1e-6)


def test_shared_prefix_gradient_is_the_sum_over_rows():
    case = Case(nq=13, nk=17, p=9, b=3, hq=4, hkv=2, padding="right")
    args, out, lse, grad_out = _direct_inputs(case)
    shared = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [False] * 3 + [True] * 2)
    per_row = dict(args, prefix_k=args["prefix_k"].expand(3, -1, -1, -1),
                   prefix_v=args["prefix_v"].expand(3, -1, -1, -1))
    rows = run_bwd(tbwd.prefix_attention_bwd, per_row, grad_out, None, out, lse, [False] * 3 + [True] * 2)
    for g_shared, g_rows in zip(shared[3:], rows[3:]):
        assert g_shared.shape == (1, 2, 9, 32)
        torch.testing.assert_close(g_shared[0], g_rows.sum(0), rtol=1e-5, atol=1e-6)


PROMPT_ONLY_CASES = [
    (Case(nq=37, nk=41, p=1, causal=True, padding="left"), torch.float32),
    (Case(nq=113, nk=37, p=64, hq=4, hkv=1, form="per_row", causal=True), torch.bfloat16),
    (Case(nq=37, nk=20, p=7, form="bank", b=3, t=4, bias="full", softcap=4.0, dropout_p=0.2),
     torch.float32),
    (Case(nq=113, nk=50, p=7, d=80, hq=6, hkv=2, causal=True, window=9, padding="right"),
     torch.float16),
]


@pytest.mark.parametrize("case,dtype", PROMPT_ONLY_CASES,
                         ids=lambda x: x.id() if isinstance(x, Case) else str(x))
def test_prompt_only_accuracy(case, dtype):
    """Prompt-only backward through the op (q, k, v frozen) vs the float64 reference: shared,
    per-row and bank prefixes, P in {1, 7, 64}, odd Nq, MQA/GQA, D = 80, masks, bias, softcap,
    dropout, in the three dtypes."""
    check_against_reference(case, dtype, backend="triton", device=DEVICE, seed=31,
                            grad_for=("prefix_k", "prefix_v"), dropout_mask_fn=dropout_keep_mask)


def test_prompt_only_lse_gradient():
    """grad_lse enters the prefix kernel's in-kernel delta."""
    check_bwd(Case(nq=37, nk=13, p=7, hq=4, hkv=2, causal=True), torch.float32, use_lse_grad=True,
              output_mask=(False, False, False, True, True))


@pytest.mark.parametrize("n_chunk", [1, 3])
def test_prefix_chunks_bit_reproducible(monkeypatch, n_chunk):
    """The query rows split over n_chunk programs per (row, KV head): float32 partials summed in
    a fixed order, so two runs are bitwise equal; any chunking gives the same gradients up to
    float32 summation order."""
    case = Case(nq=70, nk=9, p=7, b=3, hq=4, hkv=2, causal=True)
    args, out, lse, grad_out = _direct_inputs(case, torch.float16)
    mask = [False] * 3 + [True] * 2
    ref = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, mask)
    monkeypatch.setattr(tbwd, "INTERPRET_CONFIG", tbwd.Config(16, 32, 4, 1))
    rows = -(-case.nq // n_chunk)
    monkeypatch.setattr(tbwd, "_prefix_chunks", lambda *a: (-(-case.nq // rows), rows))
    first = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, mask)
    second = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, mask)
    for a, b, c in zip(ref[3:], first[3:], second[3:]):
        assert a.dtype == b.dtype == torch.float16
        assert torch.equal(b, c)
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)


def test_prefix_blocks():
    """BLOCK_P: the smallest block of the table holding the whole prefix, else the largest; every
    table offers a 16-row block (a short prefix is not padded far)."""
    from ptkernels.backends.triton.attention_bwd_prefix import prefix_block
    from ptkernels.backends.triton import configs

    assert [prefix_block(p, [16, 64, 128]) for p in (1, 16, 17, 64, 65, 128, 300)] == \
        [16, 16, 64, 64, 128, 128, 128]
    for arch in configs.ARCHS:
        for dtype in configs.DTYPES:
            for bd in configs.HEAD_DIM_BUCKETS:
                for cls in tbwd.CLASSES:
                    blocks = [c.block_n for c in tbwd.candidates("dprefix", arch, dtype, bd, cls)]
                    assert prefix_block(7, blocks) == 16 and len(set(blocks)) == len(blocks)


DETERMINISTIC_CASES = [CORE_CASES[i] for i in (0, 4, 5, 6, 10, 12, 15, 17)]


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=Case.id)
def test_deterministic_path_accuracy(case, monkeypatch, launches):
    """PTKERNELS_DETERMINISTIC=1: the 7-product path (separate dQ and dK/dV kernels, no atomics)
    on light calls, vs the float64 reference; the default took the fused path on the same call."""
    monkeypatch.setenv("PTKERNELS_DETERMINISTIC", "1")
    check_bwd(case, torch.float32)
    assert "dq" in launches and "dkdv_dq" not in launches and "dq_prefix" not in launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_and_separate_paths_agree(dtype, monkeypatch):
    """The same light call (bank prefix, GQA, causal, window, padding; 16x16 tiles so that each
    query block gathers dQ from several key blocks) through both paths: both within the error
    budget of the reference, and within float32 summation order (bf16: one rounding) of each
    other; dK, dV and the prefix gradients do not depend on the path (bitwise)."""
    monkeypatch.setattr(tbwd, "INTERPRET_CONFIG", tbwd.Config(16, 16, 4, 1))
    case = Case(nq=45, nk=70, p=9, hq=4, hkv=2, causal=True, window=21, padding="left",
                form="bank", b=3, t=2)
    check_bwd(case, dtype)
    args, out, lse, grad_out = _direct_inputs(case, dtype)
    fused = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    monkeypatch.setenv("PTKERNELS_DETERMINISTIC", "1")
    check_bwd(case, dtype)
    separate = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(fused[0], separate[0], rtol=tol, atol=tol)
    assert not torch.equal(fused[0], torch.zeros_like(fused[0]))
    assert all(torch.equal(a, b) for a, b in zip(fused[1:], separate[1:]))


def test_deterministic(monkeypatch, launches):
    """With determinism requested (torch.use_deterministic_algorithms or the environment), no
    atomics: two runs are bitwise equal."""
    case = Case(nq=19, nk=23, p=7, hq=4, hkv=1, causal=True, form="bank", b=3, t=2)
    args, out, lse, grad_out = _direct_inputs(case, torch.float16)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    first = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    second = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    assert launches == SEPARATE * 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_backward_path_choice(monkeypatch):
    """The fused dQ needs a call whose class has fused tiles (light; dropout alone in 16-bit at
    D <= 128) that asks for dQ and dK, has sequence keys and an accumulator with int32 in-head
    offsets, and no determinism request."""
    monkeypatch.delenv("PTKERNELS_DETERMINISTIC", raising=False)
    ft = tbwd.fused_tiles
    for arch in (80, 86, 90):
        assert ft("light", arch, torch.float32, 128) and ft("light", arch, torch.bfloat16, 256)
        assert ft("dropout", arch, torch.bfloat16, 64) and ft("dropout", arch, torch.float16, 32)
        assert ft("dropout", arch, torch.bfloat16, 128)
        assert not ft("dropout", arch, torch.bfloat16, 256)   # no dQ tile fits
        assert not ft("dropout", arch, torch.float32, 64)     # fp32 fused tiles: light only
        assert not ft("heavy", arch, torch.bfloat16, 64)
    fused = tbwd.uses_fused_dq
    assert fused(True, True, True, 5, 2 ** 31 - 1)
    assert not fused(True, True, False, 5, 64)         # no fused tiles for the call's class
    assert not fused(True, False, True, 5, 64)         # k frozen: dQ alone
    assert not fused(False, True, True, 5, 64)         # q frozen: dK/dV alone
    assert not fused(True, True, True, 0, 64)          # no sequence keys
    assert not fused(True, True, True, 5, 2 ** 31)     # offsets past int32
    assert tbwd.backward_path().startswith("5-product")
    monkeypatch.setenv("PTKERNELS_DETERMINISTIC", "1")
    assert not fused(True, True, True, 5, 64) and tbwd.backward_path().startswith("7-product")


@pytest.mark.parametrize("output_mask,expected",
                         [((True, False, True, False, False), ["preprocess", "dq", "dkdv"]),
                          ((False, True, True, True, True), ["preprocess", "dkdv", "dprefix",
                                                             "dprefix_sum"]),
                          ((True, True, False, False, False), ["preprocess", "dkdv_dq",
                                                               "dq_prefix"])], ids=str)
def test_launches_per_output_mask(output_mask, expected, launches):
    case = Case(nq=21, nk=25, p=7, causal=True, form="bank")
    check_bwd(case, torch.float32, output_mask=output_mask)
    assert launches == expected


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 32), (torch.float16, 32),
                                     (torch.bfloat16, 128)], ids=str)
def test_dropout_only_low_precision_takes_the_fused_path(dtype, d, launches):
    """A dropout-only 16-bit call up to D = 128 runs the 5-product kernels (dQ by atomics), with
    the forward's mask regenerated, against the float64 reference."""
    case = Case(dropout_p=0.25, causal=True, padding="left", form="bank", hq=4, hkv=2, nq=19,
                nk=23, p=5, d=d)
    check_against_reference(case, dtype, backend="triton", device=DEVICE, seed=21,
                            dropout_mask_fn=dropout_keep_mask)
    assert "dkdv_dq" in launches and "dq_prefix" in launches and "dq" not in launches


def test_no_sequence_keys_takes_the_dq_kernel(launches):
    """Nk == 0: the prefix keys only; the dQ kernel (nothing to fuse into) and exact zeros."""
    case = Case(nq=5, nk=0, p=3)
    args, out, lse, grad_out = _direct_inputs(case)
    run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    assert launches == ["preprocess", "dq", "dprefix", "dprefix_sum"]


def test_any_strides():
    """Non-contiguous inputs, upstream gradient and prefix give the same gradients (bitwise)."""
    case = Case(nq=13, nk=17, p=5, form="per_row", causal=True, bias="full")
    args, out, lse, grad_out = _direct_inputs(case)
    ref = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)

    def strided(x):  # same values, (B, N, H, D)-style memory layout
        return x.transpose(1, 2).contiguous().transpose(1, 2)

    odd = dict(args, **{n: strided(args[n]) for n in ("q", "k", "v", "prefix_k", "prefix_v", "attn_bias")})
    got = run_bwd(tbwd.prefix_attention_bwd, odd, strided(grad_out), None, strided(out), lse, [True] * 5)
    for a, b in zip(ref, got):
        assert b.is_contiguous() and torch.equal(a, b)


def test_nothing_to_differentiate():
    case = Case(nq=5, nk=0, p=3)
    args, out, lse, grad_out = _direct_inputs(case)
    dq, dk, dv, dpk, dpv = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    assert dk.shape == (2, 2, 0, 32) and not torch.isnan(dq).any() and not torch.isnan(dpk).any()


def test_table_class():
    """Light without bias / softcap / dropout, "dropout" with dropout alone, heavy with a bias or
    soft-capping; a dropout-only call gets pipelined tiles where its table has them."""
    def cls(bias, softcap, dropout):
        return tbwd.table_class({"HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "HAS_DROPOUT": dropout})

    assert cls(False, False, False) == "light" and cls(False, False, True) == "dropout"
    assert {cls(True, False, False), cls(False, True, False), cls(True, True, True),
            cls(True, False, True)} == {"heavy"}
    with pytest.raises(ValueError, match="features"):
        tbwd.candidates("dq", 90, torch.bfloat16, 64, "bias")
    for arch in (80, 86, 90):
        for kernel in ("dq", "dkdv"):
            drop = tbwd.candidates(kernel, arch, torch.bfloat16, 128, "dropout")
            heavy = tbwd.candidates(kernel, arch, torch.bfloat16, 128, "heavy")
            assert drop[0].num_stages > 1 and drop[-1] == heavy[0]
        # fused kernels serve light calls and dropout-only ones up to D = 128, never heavy ones
        assert tbwd.candidates("dkdv_dq", arch, torch.bfloat16, 128, "dropout")
        assert tbwd.candidates("dkdv_dq", arch, torch.bfloat16, 256, "dropout") == []
        assert tbwd.candidates("dkdv_dq", arch, torch.bfloat16, 64, "heavy") == []


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_aot_specs_cover_every_candidate(arch):
    """tests/test_triton_aot.py compiles AOT_SPECS: every configuration the backward may pick
    must be among them, with the heaviest feature set of its table (light: no bias, softcap,
    dropout), the head dim specialized as at runtime, and the loop structure the host picks
    (``peels_masks``): without a window and, for the kernels with a sequence loop, with one."""
    from ptkernels.backends.triton import configs

    specs = {s["name"].removeprefix("attention_bwd_"): s for s in tbwd.AOT_SPECS}
    assert set(specs) == {"preprocess", "dq", "dkdv", "dkdv_dq", "dq_prefix", "dprefix",
                          "dprefix_sum"}
    for kernel in ("dq", "dkdv", "dkdv_dq", "dq_prefix", "dprefix"):
        light_only = kernel in tbwd.FUSED_KERNELS
        variants = specs[kernel]["variants"](arch)
        compiled = {(v["label"].split()[0], v["label"].split()[1], v["config"], v["features"])
                    for v in variants}
        if kernel in tbwd.WINDOW_KERNELS:   # every compile also with a window
            plain = {(v["label"], v["config"]) for v in variants if "shape" not in v
                     and not v["label"].endswith(" window")}
            assert plain == {(v["label"].removesuffix(" window"), v["config"]) for v in variants
                             if v["label"].endswith(" window")}
        for v in specs[kernel]["variants"](arch):
            cx = v["constexprs"]
            # compiled with exactly its class's bias / softcap / dropout flags
            on = tuple(f for f in ("HAS_BIAS", "HAS_SOFTCAP", "HAS_DROPOUT") if cx[f])
            assert on == tbwd.CLASS_FEATURES[v["features"]], v["label"]
            assert cx["D"] == cx["BLOCK_D"] or "shape" in v
            # every mask / prefix feature the kernel has is on
            assert cx.get("PREFIX_MODE", 3) == 3
            assert all(cx.get(f, True) for f in ("CAUSAL", "HAS_KPM"))
            window = v["label"].endswith(" window")
            assert cx.get("HAS_WINDOW", window) == window
            if "PEEL" in cx:
                assert cx["PEEL"] == tbwd.peels_masks(v["features"], cx["BLOCK_D"], window)
            # and the path's own constexprs are those the host passes for that kernel name
            assert cx.get("FUSE_DQ", kernel == "dkdv_dq") == (kernel == "dkdv_dq")
            assert cx.get("SEQ_KEYS", kernel != "dq_prefix") == (kernel != "dq_prefix")
        for dtype in configs.DTYPES:
            for bd in configs.HEAD_DIM_BUCKETS:
                for cls in tbwd.CLASSES:
                    cands = tbwd.candidates(kernel, arch, dtype, bd, cls)
                    if dtype == torch.float32 or not light_only or cls == "light":
                        assert cands, (kernel, arch, dtype, bd, cls)
                    elif cls == "heavy":   # no fused kernel for a bias or softcap
                        assert not cands, (kernel, arch, bd)
                    for cfg in cands:
                        if light_only and dtype == torch.float32:
                            want = ("light",)   # fp32 fused runs light calls only (fused_tiles)
                        elif light_only:
                            want = (cls,)
                        elif dtype == torch.float32:
                            want = ("heavy",)
                        else:   # a dropout config may be covered by the heavy compile
                            same_loops = tbwd.peels_masks("dropout", bd, False) == \
                                tbwd.peels_masks("heavy", bd, False)
                            want = {"light": ("light",),
                                    "dropout": ("dropout", "heavy") if same_loops else ("dropout",),
                                    "heavy": ("heavy",)}[cls]
                        keys = [(configs.aot_dtype(dtype), f"d{bd}", str(cfg), w) for w in want]
                        assert any(k in compiled for k in keys), \
                            f"{kernel} sm_{arch}: {keys[0]} is never compiled"


# ----------------------------------------------------------------------------------------------
# GPU: the same checks compiled for the device, determinism under load, timings
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CORE_CASES + [Case(dropout_p=0.2, causal=True, form="bank")],
                         ids=Case.id)
def test_gpu_cases(case, dtype):
    check_against_reference(case, dtype, backend="triton", device="cuda", seed=21,
                            dropout_mask_fn=dropout_keep_mask)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
def test_gpu_head_dims(d):
    check_against_reference(Case(nq=300, nk=517, p=64, d=d, causal=True, padding="left"),
                            torch.bfloat16, backend="triton", device="cuda", seed=d)


@pytest.mark.gpu
def test_gpu_deterministic_50_runs(monkeypatch):
    """The deterministic path under load (the default fused dQ uses float32 atomics)."""
    monkeypatch.setenv("PTKERNELS_DETERMINISTIC", "1")
    case = Case(b=4, hq=8, hkv=2, nq=509, nk=1021, p=64, d=128, causal=True, form="bank", t=3)
    args, out, lse, grad_out = _direct_inputs(case, torch.bfloat16)
    first = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    for _ in range(50):
        again = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_fused_and_separate_paths_agree(d, monkeypatch, launches):
    """On the GPU (real atomics, the sm_80 / sm_90 tables): the fused 5-product backward and the
    deterministic 7-product one give the same dK, dV, dprefix (bitwise) and dQ up to float32
    summation order, for a long causal GQA call."""
    case = Case(b=2, hq=8, hkv=2, nq=777, nk=1021, p=64, d=d, causal=True, form="bank", t=3,
                padding="left")
    args, out, lse, grad_out = _direct_inputs(case, torch.bfloat16)
    fused = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    assert "dkdv_dq" in launches
    monkeypatch.setenv("PTKERNELS_DETERMINISTIC", "1")
    separate = run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5)
    torch.testing.assert_close(fused[0], separate[0], rtol=1.6e-2, atol=1.6e-2)
    assert all(torch.equal(a, b) for a, b in zip(fused[1:], separate[1:]))


@pytest.mark.gpu
def test_gpu_timing_full_vs_prompt_only(monkeypatch):
    """Prints the fused (default), the deterministic 7-product and the prompt-only backward."""
    import triton.testing

    case = Case(b=4, hq=16, hkv=16, nq=2048, nk=2048, p=64, d=128, causal=True)
    args, out, lse, grad_out = _direct_inputs(case, torch.bfloat16)
    full_ms = triton.testing.do_bench(
        lambda: run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5))
    prompt_ms = triton.testing.do_bench(
        lambda: run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse,
                        [False] * 3 + [True] * 2))
    monkeypatch.setenv("PTKERNELS_DETERMINISTIC", "1")
    separate_ms = triton.testing.do_bench(
        lambda: run_bwd(tbwd.prefix_attention_bwd, args, grad_out, None, out, lse, [True] * 5))
    # FA convention: backward = 2.5x the forward's 4 * B * H * D * (visible pairs) FLOPs.
    pairs = case.nq * case.p + case.nq * (case.nq + 1) / 2
    flops = 2.5 * 4 * case.b * case.hq * case.d * pairs
    print(f"\ntriton bwd bf16 {case.id()}: full {full_ms:.3f} ms ({flops / full_ms / 1e9:.1f} "
          f"TFLOP/s), deterministic {separate_ms:.3f} ms ({flops / separate_ms / 1e9:.1f} "
          f"TFLOP/s), prompt-only {prompt_ms:.3f} ms ({full_ms / prompt_ms:.1f}x faster)")
    assert prompt_ms < full_ms
