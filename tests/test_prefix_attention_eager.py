"""The eager fast path of prefix_attention against the float64 reference (DESIGN.md's rule)."""
import pytest
import torch

from attention_cases import CORE_CASES, Case, check_against_reference
from ptkernels.backends.eager import dropout_keep_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CORE_CASES, ids=Case.id)
def test_matches_reference(case, dtype):
    check_against_reference(case, dtype, backend="eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CORE_CASES, ids=Case.id)
def test_math_segments_match_reference(case, dtype, monkeypatch):
    """The plain-math segments (what the eager backend runs on non-CPU devices)."""
    from ptkernels.backends import eager
    monkeypatch.setattr(eager, "USE_CPU_FLASH", False)
    check_against_reference(case, dtype, backend="eager")


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_head_dims(d):
    check_against_reference(Case(nq=33, nk=45, p=7, d=d, causal=True, padding="left"), torch.float32)


@pytest.mark.parametrize("case", [Case(causal=True, padding="left"), Case(form="bank", p=3),
                                  Case(p=0, form="none", causal=True)], ids=Case.id)
def test_lse_gradient(case):
    """A loss that uses the returned logsumexp differentiates through it too."""
    check_against_reference(case, torch.float32, use_lse_grad=True)


@pytest.mark.parametrize("case", [Case(dropout_p=0.2), Case(dropout_p=0.3, causal=True, padding="left",
                                                               form="bank", hq=4, hkv=1),
                                  Case(dropout_p=0.1, softcap=4.0, nq=9, nk=17, causal=True)], ids=Case.id)
def test_dropout_same_mask(case):
    """With the eager backend's own mask, dropout output and gradients equal the reference's."""
    check_against_reference(case, torch.float32, dropout_mask_fn=lambda s, shape, p, prefix_len: dropout_keep_mask(s, shape, p, "cpu"))


def test_non_contiguous_inputs():
    """Any strides: (B, N, H, D) layouts transposed to (B, H, N, D), and a sliced prefix."""
    from ptkernels import prefix_attention
    from ptkernels.backends.eager import reference_prefix_attention
    torch.manual_seed(0)
    q = torch.randn(2, 11, 4, 32).transpose(1, 2)
    k = torch.randn(2, 13, 2, 32).transpose(1, 2)
    v = torch.randn(2, 13, 2, 32).transpose(1, 2)
    pk = torch.randn(2, 10, 32)[:, ::2]
    pv = torch.randn(2, 5, 64)[..., ::2]
    out = prefix_attention(q, k, v, pk, pv, causal=True)
    ref, _ = reference_prefix_attention(q.double(), k.double(), v.double(), pk.double(), pv.double(), causal=True)
    assert (out.double() - ref).abs().max() < 1e-5


CHUNKED_CASES = [c for c in CORE_CASES if (c.causal or c.window) and 8 <= c.nq <= 64] + [
    Case(nq=24, nk=24, p=5, causal=True, dropout_p=0.2, hq=4, hkv=2, padding="left"),
    Case(nq=20, nk=31, p=3, causal=True, window=6, dropout_p=0.1, softcap=4.0),
]


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=Case.id)
def test_math_query_chunks_match_reference(case, monkeypatch):
    """The math sequence segment over causal/windowed query chunks (each against the keys it can
    see; production uses 128-row chunks, these 4-row ones put several chunks in small shapes)."""
    from ptkernels.backends import eager
    monkeypatch.setattr(eager, "USE_CPU_FLASH", False)
    monkeypatch.setattr(eager, "_CHUNK_ROWS", 4)
    monkeypatch.setattr(eager, "_MAX_CHUNKS", 4)
    check_against_reference(case, torch.float32, dropout_mask_fn=lambda s, shape, p, prefix_len: dropout_keep_mask(s, shape, p, "cpu"))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_token_major_inputs_fold_the_shared_prefix(dropout_p):
    """Token-major q (HF's projections transposed) with a shared prefix: the prefix products run
    per head over all B * Nq rows; outputs and gradients (returned token-major) match."""
    from ptkernels import prefix_attention
    from ptkernels.backends.eager import reference_prefix_attention
    from ptkernels.ops.prefix_attention import draw_dropout_seed
    torch.manual_seed(0)
    leaves = [torch.randn(3, 11, 4, 16), torch.randn(3, 13, 2, 16), torch.randn(3, 13, 2, 16),
              torch.randn(2, 5, 16), torch.randn(2, 5, 16)]
    leaves = [x.requires_grad_() for x in leaves]
    q, k, v = (x.transpose(1, 2) for x in leaves[:3])
    mask = None
    if dropout_p:
        torch.manual_seed(7)
        mask = dropout_keep_mask(draw_dropout_seed(), (3, 4, 11, 18), dropout_p, "cpu")
    torch.manual_seed(7)
    out = prefix_attention(q, k, v, leaves[3], leaves[4], causal=True, dropout_p=dropout_p)
    assert out.stride() == (11 * 4 * 16, 16, 4 * 16, 1)
    gy = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, gy.float())
    ref, _ = reference_prefix_attention(q.double(), k.double(), v.double(), leaves[3].double(),
                                        leaves[4].double(), causal=True, dropout_mask=mask,
                                        dropout_p=dropout_p)
    want = torch.autograd.grad(ref, leaves, gy)
    assert (out.double() - ref).abs().max() < 1e-5
    for name, a, b in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, want):
        assert (a.double() - b).abs().max() < 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CHUNKED_CASES[:-2] + [Case(nq=24, nk=24, p=5, causal=True, hq=4, hkv=2),
                                                       Case(nq=24, nk=24, p=0, form="none", causal=True)],
                         ids=Case.id)
@pytest.mark.parametrize("chunks", [2, 4])
def test_flash_query_blocks_match_reference(case, dtype, chunks, monkeypatch):
    """The CPU flash sequence segment block by block (causal query chunks; square causal ones
    split into unmasked keys + an is_causal diagonal block), with 4-row chunks; 2 chunks tile
    the gradients (written, then added), 4 overlap (zero-filled, then added)."""
    from ptkernels.backends import eager
    monkeypatch.setattr(eager, "_CHUNK_ROWS", 4)
    monkeypatch.setattr(eager, "_MAX_CHUNKS", chunks)
    check_against_reference(case, dtype)
