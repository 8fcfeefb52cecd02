"""A trainable ``attn_bias`` gets its gradient from prefix_attention (DeBERTa's disentangled terms
and T5's relative bias depend on trainable tensors): compared with autograd through the float64
eager reference, for shared / per-row / bank prefixes, GQA, causal + window + padding, softcap,
dropout (the backend's own keep-mask) and a used logsumexp."""
import pytest
import torch

import ptkernels
from ptkernels.backends.eager import dropout_keep_mask, reference_prefix_attention
from ptkernels.ops.prefix_attention import draw_dropout_seed

CASES = {
    "shared": dict(prefix="shared"),
    "bank-gqa-causal-window-pad": dict(prefix="bank", hkv=1, causal=True, window=4, pad=True),
    "per-row-softcap": dict(prefix="row", softcap=5.0),
    "no-prefix-broadcast-bias": dict(prefix=None, bias_shape=(1, 4, 5, 9)),
    "dropout": dict(prefix="shared", dropout_p=0.3),
    "lse": dict(prefix="shared", lse=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bias_gradient_matches_reference(name):
    c = CASES[name]
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, nq, nk, d, p = 2, 4, c.get("hkv", 2), 5, 9, 8, 3

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    q, k, v = r(b, hq, nq, d), r(b, hkv, nk, d), r(b, hkv, nk, d)
    kw = dict(causal=c.get("causal", False), window=c.get("window"), softcap=c.get("softcap"))
    pk = pv = idx = None
    if c["prefix"] == "shared":
        pk, pv = r(hkv, p, d), r(hkv, p, d)
    elif c["prefix"] == "row":
        pk, pv = r(b, hkv, p, d), r(b, hkv, p, d)
    elif c["prefix"] == "bank":
        pk, pv, idx = r(3, hkv, p, d), r(3, hkv, p, d), torch.tensor([2, 0])
    ncols = nk + (p if pk is not None else 0)
    bias = r(*c.get("bias_shape", (b, hq, nq, ncols))).requires_grad_()
    mask = None
    if c.get("pad"):
        mask = torch.ones(b, nk, dtype=torch.bool)
        mask[0, :3] = False
    dp = c.get("dropout_p", 0.0)
    torch.manual_seed(11)
    seed = draw_dropout_seed()
    torch.manual_seed(11)
    out, lse = ptkernels.prefix_attention(q, k, v, pk, pv, prefix_index=idx, attention_mask=mask,
                                          attn_bias=bias, dropout_p=dp, return_lse=True,
                                          backend="eager", **kw)
    w_out, w_lse = r(*out.shape), r(*lse.shape)
    loss = (out * w_out).sum() + ((lse * w_lse).sum() if c.get("lse") else 0)
    (got,) = torch.autograd.grad(loss, bias)

    keep = dropout_keep_mask(seed, (b, hq, nq, ncols), dp, "cpu") if dp > 0 else None
    bias_ref = bias.detach().clone().requires_grad_()
    ref, ref_lse = reference_prefix_attention(q, k, v, pk, pv, prefix_index=idx, attention_mask=mask,
                                              attn_bias=bias_ref.expand(b, hq, nq, ncols),
                                              dropout_mask=keep, dropout_p=dp, **kw)
    torch.testing.assert_close(out, ref)
    loss_ref = (ref * w_out).sum() + ((ref_lse * w_lse).sum() if c.get("lse") else 0)
    (want,) = torch.autograd.grad(loss_ref, bias_ref)
    assert got.shape == bias.shape
    torch.testing.assert_close(got, want)


def test_bias_gradient_float32_within_tolerance():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=g) for _ in range(3))
    pk, pv = torch.randn(4, 2, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    bias = torch.randn(1, 4, 6, 8, generator=g, requires_grad=True)
    out = ptkernels.prefix_attention(q, k, v, pk, pv, attn_bias=bias, causal=True, backend="eager")
    (got,) = torch.autograd.grad(out.square().sum(), bias)
    b64 = bias.detach().double().requires_grad_()
    ref, _ = reference_prefix_attention(q.double(), k.double(), v.double(), pk.double(), pv.double(),
                                        attn_bias=b64.expand(2, 4, 6, 8), causal=True)
    (want,) = torch.autograd.grad(ref.square().sum(), b64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
