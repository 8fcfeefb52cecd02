"""``ptkernels.gpc_cell``: eager and Triton (interpreter on CPU) against the float64 reference.

DESIGN.md's rule: a backend's error against float64 is at most 2x (output) / 3x (gradients) the
error of the eager op in the same dtype, plus a small absolute term. Fresh random inputs, outputs
poisoned with NaN (PTKERNELS_DEBUG_POISON=1) so an unwritten element fails.
"""
from __future__ import annotations

import pytest
import torch

import ptkernels
from ptkernels.backends import availability
from ptkernels.backends.eager_gpc import num_gates, reference_gpc_cell

VARIANTS = ("lstm", "candidate", "gru", "reinject")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = availability("triton", "gpc_cell", torch.device(DEVICE))[0]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton gpc_cell unavailable: "
                                  + availability("triton", "gpc_cell", torch.device(DEVICE))[1])


def test_triton_gpc_cell_is_available():
    """The Triton tests below skip only off-Linux; here (CI) a broken import must fail, not skip."""
    import sys
    if sys.platform.startswith("linux"):
        assert HAS_TRITON, availability("triton", "gpc_cell", torch.device(DEVICE))[1]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("PTKERNELS_DEBUG_POISON", "1")


def make_inputs(b, m, d, variant, shared_state, seed):
    gen = torch.Generator().manual_seed(seed)
    n = num_gates(variant)
    u = torch.randn(b, m, d, generator=gen, dtype=torch.float64)
    s = torch.randn(*((m, d) if shared_state else (b, m, d)), generator=gen, dtype=torch.float64)
    w = torch.randn(2 * d, n * d, generator=gen, dtype=torch.float64) / (2 * d) ** 0.5
    bias = torch.randn(n * d, generator=gen, dtype=torch.float64) * 0.5
    g = torch.randn(b, m, d, generator=gen, dtype=torch.float64)
    return [u, s, w, bias], g


def run(inputs, g, variant, dtype, backend, device="cpu"):
    leaves = [x.detach().to(device=device, dtype=dtype).clone().requires_grad_() for x in inputs]
    if backend == "reference":
        out = reference_gpc_cell(*leaves, variant=variant)
    else:
        out = ptkernels.gpc_cell(*leaves, variant=variant, backend=backend)
    out.backward(g.to(device=device, dtype=dtype))
    return [out.detach().double().cpu()] + [x.grad.double().cpu() for x in leaves]


def err(a, b):
    return (a - b).abs().max().item()


def check_rule(inputs, g, variant, dtype, backend):
    exact = run(inputs, g, variant, torch.float64, "reference")
    base = run(inputs, g, variant, dtype, "eager")
    got = run(inputs, g, variant, dtype, backend, DEVICE)
    names = ("out", "dU", "dS", "dW", "db")
    for i, name in enumerate(names):
        assert torch.isfinite(got[i]).all(), f"{name}: non-finite values (unwritten output?)"
        factor = 2.0 if i == 0 else 3.0
        atol = ATOL[dtype] * max(1.0, exact[i].abs().max().item())
        e_k, e_b = err(got[i], exact[i]), err(base[i], exact[i])
        assert e_k <= factor * e_b + atol, f"{name}: error {e_k:.3g} > {factor} x {e_b:.3g} + {atol:.3g}"


@pytest.mark.parametrize("shared", [False, True], ids=["bmd", "md"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_float64_matches_reference_and_gradcheck(variant, shared):
    inputs, g = make_inputs(2, 3, 5, variant, shared, seed=1)
    exact = run(inputs, g, variant, torch.float64, "reference")
    eager = run(inputs, g, variant, torch.float64, "eager")
    for a, b in zip(eager, exact):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    leaves = [x.clone().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(lambda *x: ptkernels.gpc_cell(*x, variant=variant, backend="eager"), leaves)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_low_precision_close_to_float64(variant, dtype):
    inputs, g = make_inputs(3, 5, 32, variant, False, seed=2)
    exact = run(inputs, g, variant, torch.float64, "reference")
    got = run(inputs, g, variant, dtype, "eager")
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}[dtype]
    for a, b in zip(got, exact):
        assert err(a, b) <= tol * max(1.0, b.abs().max().item())


@needs_triton
@pytest.mark.parametrize("shared", [False, True], ids=["bmd", "md"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_against_float64(variant, dtype, shared):
    # d = 80: column and K tails (blocks of 32); m = 5, B = 3: rows straddle batch entries
    inputs, g = make_inputs(3, 5, 80, variant, shared, seed=3 + VARIANTS.index(variant))
    check_rule(inputs, g, variant, dtype, "triton")


@needs_triton
@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 37, 32), (4, 7, 96)], ids=str)
def test_triton_shapes(shape):
    inputs, g = make_inputs(*shape, "lstm", False, seed=11)
    check_rule(inputs, g, "lstm", torch.float32, "triton")


@needs_triton
def test_triton_strided_inputs_and_partial_grads():
    inputs, g = make_inputs(2, 6, 32, "candidate", False, seed=12)
    u, s, w, bias = (x.float() for x in inputs)
    u_t = u.transpose(0, 1).contiguous().transpose(0, 1)      # non-contiguous batch stride
    s_t = s[:, ::1, :].clone().as_strided(s.shape, (s.shape[1] * s.shape[2], 1, s.shape[1]))
    s_t.copy_(s)                                              # column-major inner dims
    w_t = w.t().contiguous().t()
    ref = ptkernels.gpc_cell(u, s, w, bias, variant="candidate", backend="eager")
    wl = w_t.clone().requires_grad_()
    out = ptkernels.gpc_cell(u_t.to(DEVICE), s_t.to(DEVICE), wl.to(DEVICE), bias.to(DEVICE),
                             variant="candidate", backend="triton")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    out.backward(g.float().to(DEVICE))                       # only the weight needs a gradient
    wr = w.clone().requires_grad_()
    ptkernels.gpc_cell(u, s, wr, bias, variant="candidate", backend="eager").backward(g.float())
    torch.testing.assert_close(wl.grad, wr.grad, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_weight_grads_are_deterministic():
    inputs, g = make_inputs(4, 9, 48, "lstm", True, seed=13)
    first = run(inputs, g, "lstm", torch.float32, "triton", DEVICE)
    second = run(inputs, g, "lstm", torch.float32, "triton", DEVICE)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bad_input():
    u, s, w, b = (x.float() for x in make_inputs(2, 3, 4, "lstm", False, seed=0)[0])
    with pytest.raises(ValueError, match="variant"):
        ptkernels.gpc_cell(u, s, w, b, variant="rnn")
    with pytest.raises(ValueError, match="weight"):
        ptkernels.gpc_cell(u, s, w[:, :4], b)
    with pytest.raises(ValueError, match="weight"):
        ptkernels.gpc_cell(u, s, w, b, variant="candidate")
    with pytest.raises(ValueError, match="bias"):
        ptkernels.gpc_cell(u, s, w, b[:4])
    with pytest.raises(ValueError, match="state"):
        ptkernels.gpc_cell(u, s[:1], w, b)
    with pytest.raises(ValueError, match="update"):
        ptkernels.gpc_cell(u[0], s, w, b)
    with pytest.raises((TypeError, ValueError), match="state"):
        ptkernels.gpc_cell(u, s.double(), w, b)
    if HAS_TRITON:
        with pytest.raises(TypeError, match="float64"):
            ptkernels.gpc_cell(u.double(), s.double(), w.double(), b.double(), backend="triton")


@needs_triton
@pytest.mark.parametrize("variant", ["lstm", "reinject"])
def test_gpc_module_on_triton_backend(variant):
    from ptkernels.prompts import GlobalPromptCell
    torch.manual_seed(14)
    cells = [GlobalPromptCell(32, variant, backend=b).to(DEVICE) for b in ("eager", "triton")]
    cells[1].load_state_dict(cells[0].state_dict())
    p0 = torch.randn(2, 3, 32, device=DEVICE)
    outs = []
    for cell in cells:
        s = cell.initial_state(p0)
        for u in torch.randn(3, 2, 3, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE):
            s = cell(u, s)
        s.square().sum().backward()
        outs.append((s.detach(), cell.weight.grad, cell.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
