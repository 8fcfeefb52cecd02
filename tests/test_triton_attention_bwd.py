"""Triton backward of prefix_attention (dQ, dK/dV, dprefix, prompt-only backward).

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
The backward is driven directly with ``out, lse`` from the eager forward and judged against the
float64 reference's autograd with DESIGN.md's rule (3x the eager-in-same-dtype error + atol).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from attention_cases import (ATOL, BWD_FACTOR, CORE_CASES, Case, cast, make_inputs, max_err,
                             run_reference)
from ptkernels.backends import eager

op = importlib.import_module("ptkernels.ops.prefix_attention")

tbwd = pytest.importorskip("ptkernels.backends.triton.attention_bwd")

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
    check_bwd(case, torch.float32)


LOWP_CASES = [CORE_CASES[i] for i in (2, 4, 8, 9, 10, 11, 15, 19, 23)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=Case.id)
def test_core_cases_low_precision(case, dtype):
    check_bwd(case, dtype)


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
def test_head_dims(d):
    check_bwd(Case(nq=19, nk=27, p=7, d=d, causal=True, padding="left"), torch.float32)


@pytest.mark.parametrize("case", [Case(causal=True, padding="left"), Case(form="bank", p=3),
                                  Case(p=0, form="none", causal=True, nq=9, nk=5)], ids=Case.id)
def test_lse_gradient(case):
    """delta = rowsum(dO * O) - grad_lse: a loss that uses the logsumexp differentiates through it."""
    check_bwd(case, torch.float32, use_lse_grad=True)


def test_small_tiles_and_window_skipping(monkeypatch):
    """16x16 tiles: many key/query blocks, so causal/window block skipping is really exercised."""
    monkeypatch.setattr(tbwd, "INTERPRET_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 16})
    check_bwd(Case(nq=45, nk=70, p=20, causal=True, window=9, padding="right"), torch.float32)
    check_bwd(Case(nq=45, nk=30, p=20, window=7, form="bank", b=3, t=2), torch.float32)
