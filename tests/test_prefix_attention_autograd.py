"""Autograd of prefix_attention (eager backend): gradcheck, random shapes, prompt-only backward,
rows that see no key, torch.compile."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptkernels
from torch.nn.attention.bias import causal_lower_right
from attention_cases import Case, check_against_reference, make_inputs, options
from ptkernels.backends import eager
from ptkernels.ops.prefix_attention import draw_dropout_seed


GRADCHECK_CASES = [
    Case(b=2, hq=2, hkv=1, nq=3, nk=4, p=2, d=4),
    Case(b=2, hq=2, hkv=2, nq=4, nk=3, p=2, d=4, causal=True, padding="left"),
    Case(b=2, hq=4, hkv=2, nq=3, nk=5, p=3, d=4, form="per_row", window=2, causal=True),
    Case(b=3, hq=2, hkv=1, nq=3, nk=3, p=2, d=4, form="bank", t=2, softcap=2.0, bias="heads"),
    Case(b=2, hq=2, hkv=1, nq=5, nk=3, p=0, d=4, form="none", causal=True, padding="full_row"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=Case.id)
def test_gradcheck_float64(case):
    inputs = make_inputs(case, seed=0)
    names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if n in inputs]
    rest = {n: x for n, x in inputs.items() if n not in names}

    def f(*tensors):
        out, lse = ptkernels.prefix_attention(**dict(zip(names, tensors)), **rest, **options(case),
                                              return_lse=True, backend="eager")
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, [inputs[n] for n in names], eps=1e-6, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.sampled_from([1, 2, 3]),
       nq=st.integers(1, 19), nk=st.integers(1, 23), p=st.sampled_from([0, 1, 3, 8]),
       d=st.sampled_from([8, 16, 24]), form=st.sampled_from(["shared", "per_row", "bank"]),
       causal=st.booleans(), padding=st.sampled_from(["none", "left", "right"]),
       window=st.sampled_from([None, 1, 3]), softcap=st.sampled_from([None, 3.0]),
       bias=st.sampled_from([None, "heads", "rows"]), seed=st.integers(0, 2**20))
def test_random_shapes_against_float64(b, hkv, g, nq, nk, p, d, form, causal, padding, window,
                                       softcap, bias, seed):
    case = Case(b=b, hq=hkv * g, hkv=hkv, nq=nq, nk=nk, p=p, d=d,
                form="none" if p == 0 else form, causal=causal, padding=padding, window=window,
                softcap=softcap, bias=bias, t=2)
    check_against_reference(case, torch.float32, seed=seed)


@pytest.mark.parametrize("case", [Case(causal=True, padding="left"), Case(form="per_row", softcap=3.0),
                                  Case(form="bank", b=4, t=3, bias="rows", window=4, causal=True),
                                  Case(hq=6, hkv=1, nq=9, nk=30, p=64)], ids=Case.id)
def test_prompt_only_backward(case, monkeypatch):
    """Frozen q, k, v: the prefix gradients equal the full backward's, and the backend is asked
    for nothing else (so the sequence-gradient work is skipped)."""
    full = make_inputs(case, seed=1)
    frozen = {n: (x.detach().float() if x.dtype.is_floating_point else x) for n, x in full.items()}
    for n in ("prefix_k", "prefix_v"):
        frozen[n].requires_grad_(True)
    full32 = {n: (x.detach().float().requires_grad_(x.requires_grad) if x.dtype.is_floating_point else x)
              for n, x in full.items()}
    grad_out = torch.randn(case.b, case.hq, case.nq, case.d)

    masks = []
    original = eager.prefix_attention_bwd

    def spy(*args):
        masks.append(list(args[-1]))
        return original(*args)

    monkeypatch.setattr(eager, "prefix_attention_bwd", spy)
    out = ptkernels.prefix_attention(**full32, **options(case))
    g_full = torch.autograd.grad((out * grad_out).sum(), [full32["prefix_k"], full32["prefix_v"]])
    out = ptkernels.prefix_attention(**frozen, **options(case))
    g_only = torch.autograd.grad((out * grad_out).sum(), [frozen["prefix_k"], frozen["prefix_v"]])
    assert masks == [[True] * 5, [False, False, False, True, True]]
    for a, b in zip(g_full, g_only):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rows_without_keys_are_zero():
    """No prefix, causal with Nq > Nk and a fully padded row: zeros and -inf lse, finite grads."""
    q = torch.randn(2, 2, 6, 8, requires_grad=True)
    k = torch.randn(2, 2, 3, 8, requires_grad=True)
    v = torch.randn(2, 2, 3, 8, requires_grad=True)
    mask = torch.tensor([[False, False, False], [True, True, True]])
    out, lse = ptkernels.prefix_attention(q, k, v, causal=True, attention_mask=mask, return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.all(out[1, :, :3] == 0) and torch.all(torch.isneginf(lse[1, :, :3]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[1, :, 3:]).all()
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.all(q.grad[0] == 0)


def test_prefix_keeps_rows_alive():
    """With a prefix every row sees at least the prefix keys, even with all sequence keys padded."""
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    pk, pv = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, attention_mask=mask)
    ref = ptkernels.prefix_attention(q, k[:, :, :0], v[:, :, :0], pk, pv)
    torch.testing.assert_close(out, ref)


def test_empty_prefix_is_plain_attention():
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    empty = torch.randn(2, 0, 16)
    a = ptkernels.prefix_attention(q, k, v, empty, empty, causal=True)
    b = ptkernels.prefix_attention(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=causal_lower_right(7, 9))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_dropout_statistics_and_reproducibility():
    q, k, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    pk, pv = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    torch.manual_seed(3)
    a = ptkernels.prefix_attention(q, k, v, pk, pv, dropout_p=0.25)
    torch.manual_seed(3)
    b = ptkernels.prefix_attention(q, k, v, pk, pv, dropout_p=0.25)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(3)
    seed = draw_dropout_seed()
    keep = eager.dropout_keep_mask(seed, (2, 2, 64, 72), 0.25, "cpu")
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    c = ptkernels.prefix_attention(q, k, v, pk, pv, dropout_p=0.25)
    assert not torch.allclose(a, c)


def test_torch_compile_fullgraph():
    """The custom ops trace without graph breaks; compiled forward and backward match eager."""
    torch._dynamo.reset()

    def f(q, k, v, pk, pv, mask):
        return ptkernels.prefix_attention(q, k, v, pk, pv, causal=True, attention_mask=mask).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8),
              torch.randn(2, 3, 8), torch.randn(2, 3, 8)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    a = [x.clone().requires_grad_(True) for x in inputs]
    b = [x.clone().requires_grad_(True) for x in inputs]
    la, lb = f(*a, mask), compiled(*b, mask)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_torch_compile_inductor_forward():
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, pk, pv: ptkernels.prefix_attention(q, k, v, pk, pv) * 2,
                      fullgraph=True)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    pk, pv = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    torch.testing.assert_close(f(q, k, v, pk, pv), 2 * ptkernels.prefix_attention(q, k, v, pk, pv))


def test_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    from ptkernels.ops.prefix_attention import _fwd_op
    q = torch.randn(2, 4, 3, 8, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, requires_grad=True)
    v = torch.randn(2, 2, 5, 8, requires_grad=True)
    pk = torch.randn(1, 2, 3, 8, requires_grad=True)
    pv = torch.randn(1, 2, 3, 8, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    torch.library.opcheck(_fwd_op, (q, k, v, pk, pv, None, mask, None, None, True, -1, 0.0,
                                    8 ** -0.5, 0.0, "eager"))
