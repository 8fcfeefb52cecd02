"""Triton forward (main and split-K decode paths) of prefix_attention against the float64 reference.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no CUDA); shapes stay small because the interpreter costs milliseconds per loop
iteration. Outputs are poisoned with NaN before every run (PTKERNELS_DEBUG_POISON=1), so an
element the kernel forgets to write fails the NaN / error checks. The GPU-marked tests run the
same cases on CUDA (``make gpu-check``).
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from tests.attention_cases import CORE_CASES, Case, check_forward_against_reference, make_inputs

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it

from ptkernels.backends.triton import attention_fwd  # noqa: E402
from ptkernels.backends.triton.decode import forward_decode  # noqa: E402
from ptkernels.backends.triton.dropout import dropout_keep_mask  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
LOWP = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("PTKERNELS_DEBUG_POISON", "1")


def _ids(cases):
    return [c.id() for c in cases]


# fp32 on every core case; the 16-bit dtypes on a subset that still covers every feature.
LOWP_CASES = [CORE_CASES[i] for i in (2, 4, 7, 9, 11, 16, 17, 19, 21, 23)]


@pytest.mark.parametrize("case", CORE_CASES, ids=_ids(CORE_CASES))
def test_main_fp32(case):
    check_forward_against_reference(case, torch.float32, attention_fwd.forward_main, seed=1)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=_ids(LOWP_CASES))
def test_main_lowp(case, dtype):
    check_forward_against_reference(case, dtype, attention_fwd.forward_main, seed=2)


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 40, 256])
def test_head_dims(d):
    case = Case(nq=17, nk=23, p=7, d=d, causal=True, hq=2, hkv=1)
    check_forward_against_reference(case, torch.float16, attention_fwd.forward_main, seed=d)


# The interpreter's 32 x 32 tiles with keys and windows long enough that every kind of key block
# occurs in one program: whole prefix blocks and the prefix tail, the window edge band, unmasked
# interior blocks (with the key padding mask, bias, soft-capping and dropout applied there), the
# causal diagonal band and the sequence tail.
BOUNDARY_CASES = [
    Case(nq=70, nk=150, p=40, causal=True, window=100),
    Case(nq=70, nk=150, p=40, window=60, padding="left", bias="full", hq=2, hkv=1),
    Case(nq=45, nk=110, p=64, causal=True, softcap=4.0, padding="right", form="bank", b=2, t=2,
         hq=2, hkv=1),
    # rows 0..31, keys from 32 on: the last row (31 + 36) sees key 33 but not key 32, so the
    # block at 32 is an edge block and the one at 64 the first interior one
    Case(nq=64, nk=100, p=7, window=35, hq=2, hkv=1),
]


@pytest.mark.parametrize("case", BOUNDARY_CASES, ids=_ids(BOUNDARY_CASES))
def test_interior_and_boundary_blocks(case):
    check_forward_against_reference(case, torch.float32, attention_fwd.forward_main, seed=7)


def test_interior_blocks_dropout_with_recovered_mask():
    case = Case(nq=40, nk=100, p=40, dropout_p=0.2, causal=True, bias="heads", hq=2, hkv=1)
    check_forward_against_reference(case, torch.float32, attention_fwd.forward_main, seed=8,
                                    dropout_mask_fn=dropout_keep_mask)


# Decode-shaped cases: few query rows, keys crossing several split chunks (the interpreter
# uses chunks of 64 keys), prefix splits and sequence splits, masked chunks.
DECODE_CASES = [
    Case(nq=1, nk=150, p=70, d=64, causal=True),
    Case(nq=3, nk=97, p=7, d=32, hq=4, hkv=1, causal=True, padding="left"),
    Case(nq=4, nk=130, p=64, d=80, form="bank", b=3, t=2, window=40, causal=True),
    Case(nq=2, nk=70, p=7, d=32, form="per_row", softcap=4.0, bias="heads", padding="right"),
    Case(nq=5, nk=40, p=0, form="none", d=32, causal=True, padding="full_row"),
    Case(nq=16, nk=100, p=7, d=32, causal=True),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=_ids(DECODE_CASES))
def test_decode_matches_main_and_reference(case):
    inputs = make_inputs(case, seed=3, requires_grad=False)
    dtype = torch.float16
    out_d, lse_d, _ = check_forward_against_reference(case, dtype, forward_decode, inputs=inputs)
    out_m, lse_m, _ = check_forward_against_reference(case, dtype, attention_fwd.forward_main,
                                                      inputs=inputs)
    # Same math, different summation order: agree to fp16 output rounding.
    assert (out_d.float() - out_m.float()).abs().max().item() <= 2e-3
    finite = torch.isfinite(lse_m)
    assert torch.equal(finite, torch.isfinite(lse_d))
    assert (lse_d[finite] - lse_m[finite]).abs().max().item() <= 1e-4


# GQA packing (decode.py): the G query heads of one KV head share a program's rows. GQA-8 and MQA
# with every per-row quantity (causal offset, padding, bias row, dropout stream); 3 x 8 = 24 and
# 3 x 6 = 18 packed rows make row blocks that straddle heads and end in a tail. Nk = 66 and
# window 33 put the key-range bounds of the straddling blocks (packed_sequence_bounds) on a tile
# edge (the interpreter's BLOCK_N is 32): a bound one key too tight skips a whole tile and fails.
PACKED_CASES = [
    Case(b=2, hq=16, hkv=2, nq=1, nk=70, p=7, causal=True, padding="left", bias="full",
         dropout_p=0.2),
    Case(b=2, hq=16, hkv=2, nq=3, nk=66, p=40, form="per_row", causal=True, padding="right",
         bias="full", dropout_p=0.2, window=33),
    Case(b=2, hq=6, hkv=1, nq=3, nk=66, p=7, form="bank", causal=True, padding="left",
         bias="heads", dropout_p=0.3, window=30),
    Case(b=1, hq=8, hkv=1, nq=1, nk=70, p=0, form="none", causal=True, padding="right",
         bias="full", dropout_p=0.2, softcap=3.0),
]


@pytest.mark.parametrize("case", PACKED_CASES, ids=_ids(PACKED_CASES))
def test_decode_gqa_packed(case):
    check_forward_against_reference(case, torch.float32, forward_decode, seed=9,
                                    dropout_mask_fn=dropout_keep_mask)


def test_decode_gqa_packed_bf16():
    case = dataclasses.replace(PACKED_CASES[1], dropout_p=0.0)
    check_forward_against_reference(case, torch.bfloat16, forward_decode, seed=10)


def test_decode_launches_one_program_per_kv_head(monkeypatch):
    """The packed path runs: axis 0 of the decode grid counts B * Hkv (times the splits), not
    B * Hq, and axis 1 the row blocks of the G * Nq packed rows."""
    from ptkernels.backends.triton import decode

    grids = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append((grid, args[-1], kwargs["BLOCK_M"]))  # args[-1]: n_split
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(decode, "_decode_kernel", Recorder(decode._decode_kernel))
    case = dataclasses.replace(PACKED_CASES[1], dropout_p=0.0, bias=None)
    check_forward_against_reference(case, torch.float32, forward_decode, seed=11)
    (grid, n_split, block_m), = grids
    assert n_split >= 2  # the prefix and the sequence are both split
    g = case.hq // case.hkv
    assert grid == (n_split * case.b * case.hkv, -(-g * case.nq // block_m))


def test_decode_row_block():
    """Decode runs the smallest row block that holds the G * Nq packed rows (each K/V tile is
    then read once per KV head), else the largest, with the smaller blocks as fallbacks; every
    table offers 16 rows (single-token GQA up to G = 16) and a larger block (not float32 at
    D = 256, where 32 rows spill); calls without bias, softcap or dropout at D <= 128 get 128
    rows (GQA-8 with Nq up to 16) except on sm_86 at D = 128 (112 KB > 99 KB)."""
    from ptkernels.backends.triton import configs

    C = configs.Config
    cands = [C(16, 64, 4, 3), C(16, 128, 4, 3), C(64, 64, 4, 3), C(128, 32, 8, 2)]
    assert configs.decode_candidates(cands, 8) == cands[:2]
    assert configs.decode_candidates(cands, 16) == cands[:2]
    assert configs.decode_candidates(cands, 17) == [cands[2]] + cands[:2]
    assert configs.decode_candidates(cands, 65) == [cands[3], cands[2]] + cands[:2]
    assert configs.decode_candidates(cands, 200) == [cands[3], cands[2]] + cands[:2]
    for arch, bd, rows in ((80, 64, 128), (80, 128, 128), (86, 64, 128), (86, 128, 64),
                           (90, 64, 128), (90, 128, 128)):
        light = configs.candidates("decode", arch, torch.bfloat16, bd, "light")
        assert max(c.block_m for c in light) == rows, (arch, bd)
        for cls in ("bias", "softcap", "dropout", "heavy"):
            heavy = configs.candidates("decode", arch, torch.bfloat16, bd, cls)
            assert max(c.block_m for c in heavy) == 64, (arch, bd, cls)
    for arch in configs.ARCHS:
        for dtype in configs.DTYPES:
            for bd in configs.HEAD_DIM_BUCKETS:
                for cls in configs.FEATURE_CLASSES:
                    blocks = {c.block_m for c in configs.candidates("decode", arch, dtype, bd,
                                                                    cls)}
                    wide = not (dtype == torch.float32 and bd == 256)
                    assert min(blocks) == 16 and (max(blocks) > 16) == wide, (arch, dtype, bd)


@pytest.mark.parametrize("block_m", [32, 64, 128])
def test_decode_wide_row_blocks(block_m, monkeypatch):
    """The 32-, 64- and 128-row blocks the GPU picks for G * Nq > 16 (24 and 18 packed rows: one
    block holds every head of the group, with a tail; 96 rows) against the float64 reference."""
    from ptkernels.backends.triton import configs

    monkeypatch.setitem(configs.INTERPRET, "decode", configs.Config(block_m, 32, 4, 1))
    # and GQA-8 with 12 query rows (speculative decoding): 96 packed rows, one 128-row block or
    # two 64-row ones per KV head
    wide = Case(b=1, hq=16, hkv=2, nq=12, nk=70, p=7, causal=True, padding="left")
    for case in PACKED_CASES[1:3] + [wide]:
        check_forward_against_reference(case, torch.float32, forward_decode, seed=12,
                                        dropout_mask_fn=dropout_keep_mask)


def test_dispatch_rule():
    assert attention_fwd.use_decode(1, 64, 4096)
    assert attention_fwd.use_decode(16, 0, attention_fwd.DECODE_MIN_KEYS)
    assert not attention_fwd.use_decode(17, 64, 4096)
    assert not attention_fwd.use_decode(1, 7, 100)


@pytest.mark.parametrize("case", [Case(nq=21, nk=25, p=7, dropout_p=0.3, causal=True, bias="rows"),
                                  Case(nq=3, nk=100, p=40, dropout_p=0.2, form="per_row")],
                         ids=lambda c: c.id())
@pytest.mark.parametrize("path", ["main", "decode"])
def test_dropout_with_recovered_mask(case, path):
    fn = attention_fwd.forward_main if path == "main" else forward_decode
    check_forward_against_reference(case, torch.float32, fn, seed=4,
                                    dropout_mask_fn=dropout_keep_mask)


def test_dropout_mask_statistics_and_determinism():
    seed = torch.tensor([2 ** 62 + 12345])
    shape = (2, 3, 40, 90)
    m1 = dropout_keep_mask(seed, shape, 0.25, DEVICE, prefix_len=13)
    m2 = dropout_keep_mask(seed, shape, 0.25, DEVICE, prefix_len=13)
    assert m1.dtype == torch.bool and m1.shape == shape
    assert torch.equal(m1, m2)
    assert abs(m1.float().mean().item() - 0.75) < 0.01
    assert not torch.equal(m1[0, 0], m1[0, 1])  # heads draw different masks
    assert not torch.equal(m1, dropout_keep_mask(seed + 1, shape, 0.25, DEVICE, prefix_len=13))
    # the four outputs of one Philox call are independent draws: neighbours agree as often as
    # independent keep bits do (0.75^2 + 0.25^2), within and across groups of 4 keys
    agree = (m1[..., 1:] == m1[..., :-1]).float().mean().item()
    assert abs(agree - 0.625) < 0.01
    with pytest.raises(ValueError, match="prefix_len"):
        dropout_keep_mask(seed, shape, 0.25, DEVICE, prefix_len=91)


def _philox4x32(key: int, counter):
    """Philox4x32-10 (Salmon et al. 2011) in Python integers: the independent reference of the
    draws the kernels use (ptkernels/backends/triton/dropout.py)."""
    m32 = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key & m32, (key >> 32) & m32
    for _ in range(10):
        h0, l0 = divmod(0xD2511F53 * c0, 2 ** 32)
        h2, l2 = divmod(0xCD9E8D57 * c2, 2 ** 32)
        c0, c1, c2, c3 = h2 ^ c1 ^ k0, l2, h0 ^ c3 ^ k1, l0
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    return c0, c1, c2, c3


def test_dropout_mask_matches_the_documented_philox_formula():
    """keep(b, h, i, col0 + j) = philox(seed, (j // 4, i, col0, b * Hq + h))[j % 4] >=
    floor(p * 2^32), col0 = 0 for the P prefix keys and P for the sequence keys."""
    seed, p, (b, hq, nq, n_cols), plen = torch.tensor([987654321]), 0.3, (2, 2, 3, 11), 5
    got = dropout_keep_mask(seed, (b, hq, nq, n_cols), p, DEVICE, prefix_len=plen).cpu()
    thr = int(torch.tensor(p, dtype=torch.float32).item() * 2 ** 32)
    want = torch.zeros_like(got)
    for bh in range(b * hq):
        for i in range(nq):
            for col in range(n_cols):
                col0 = 0 if col < plen else plen
                j = col - col0
                r = _philox4x32(987654321, (j // 4, i, col0, bh))[j % 4]
                want[bh // hq, bh % hq, i, col] = r >= thr
    assert torch.equal(got, want)


def test_rows_without_keys_are_zero():
    # every key of batch row 0 padded and no prefix: output exactly 0, lse -inf
    case = Case(nq=9, nk=11, p=0, form="none", padding="full_row")
    out, lse, _ = check_forward_against_reference(case, torch.float32, attention_fwd.forward_main,
                                                  seed=5)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_any_strides():
    # (B, N, H, D) storage seen as (B, H, N, D), a prefix with a permuted layout, an expanded bias
    case = Case(nq=19, nk=29, p=7, hq=4, hkv=2, causal=True, bias="heads", form="per_row")

    def relayout(name, x):
        if x.dim() == 4 and name in ("q", "k", "v"):
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        if name in ("prefix_k", "prefix_v"):
            return x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
        return x

    check_forward_against_reference(case, torch.float16, attention_fwd.forward_main, seed=6,
                                    transform=relayout)


def test_empty_query():
    q = torch.randn(1, 2, 0, 32)
    k = v = torch.randn(1, 2, 5, 32)
    out, lse = attention_fwd.prefix_attention_fwd(q, k, v, None, None, None, None, None, None,
                                                  False, -1, 0.0, 0.2, 0.0)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)


# ----------------------------------------------------------------------------------------------
# GPU: the same cases compiled for the device, plus timings
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CORE_CASES + DECODE_CASES + PACKED_CASES,
                         ids=_ids(CORE_CASES + DECODE_CASES + PACKED_CASES))
def test_gpu_cases(case, dtype):
    check_forward_against_reference(case, dtype, attention_fwd.prefix_attention_fwd,
                                    device="cuda", seed=7, dropout_mask_fn=dropout_keep_mask)
    check_forward_against_reference(case, dtype, forward_decode, device="cuda", seed=7,
                                    dropout_mask_fn=dropout_keep_mask)


@pytest.mark.gpu
def test_gpu_timing():
    import triton.testing

    case = Case(b=4, hq=16, hkv=16, nq=2048, nk=2048, p=64, d=128, causal=True)
    inputs = make_inputs(case, seed=8, requires_grad=False)
    from tests.attention_cases import cast, normalized_args

    args = normalized_args(cast(inputs, torch.bfloat16, "cuda"), case)
    attention_fwd.prefix_attention_fwd(*args)
    ms = triton.testing.do_bench(lambda: attention_fwd.prefix_attention_fwd(*args))
    flops = 4 * case.b * case.hq * case.d * (case.nq * case.p + case.nq * (case.nq + 1) / 2)
    print(f"\ntriton fwd bf16 {case.id()}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s")
    assert ms > 0


@pytest.mark.parametrize("nq", [5, 1], ids=["main", "decode"])
def test_nan_in_one_query_row_stays_in_that_row(nq):
    """As the eager op documents it: the corrupted query row's output is NaN (its lse NaN or
    -inf), every other row equals the clean run."""
    import ptkernels
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, nq, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 2, 7, 16, generator=g).to(DEVICE) for _ in range(2))
    pk = torch.randn(2, 3, 16, generator=g).to(DEVICE)
    clean = ptkernels.prefix_attention(q, k, v, pk, pk, causal=True, backend="triton")
    q[1, 2, nq - 1, 0] = float("nan")
    out, lse = ptkernels.prefix_attention(q, k, v, pk, pk, causal=True, return_lse=True,
                                          backend="triton")
    row = torch.zeros(out.shape[:-1], dtype=torch.bool, device=DEVICE)
    row[1, 2, nq - 1] = True
    assert torch.equal(out[~row], clean[~row])
    assert bool(torch.isnan(out[1, 2, nq - 1]).all())
    assert bool(torch.isnan(lse[1, 2, nq - 1]) | torch.isneginf(lse[1, 2, nq - 1]))
