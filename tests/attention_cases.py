"""Shared test machinery for every backend of ``prefix_attention``.

* ``Case``: one configuration (shapes, prefix form, masking options).
* ``make_inputs``: fresh random inputs for a case (never zeros).
* ``check_against_reference``: runs a backend and the float64 reference, and judges the output,
  the logsumexp and every gradient with DESIGN.md's rule: the error against float64 must be at
  most ``FWD_FACTOR`` (2x, output) / ``BWD_FACTOR`` (3x, gradients) the error of the plain eager
  reference run in the same dtype, plus a small absolute term.
"""
from __future__ import annotations

import dataclasses
import math

import torch

import ptkernels
from ptkernels.backends.eager import reference_prefix_attention

FWD_FACTOR = 2.0
BWD_FACTOR = 3.0
# The absolute slack: a few units of the dtype's rounding at the magnitudes involved.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 2
    hq: int = 4
    hkv: int = 2
    nq: int = 13
    nk: int = 13
    p: int = 7
    d: int = 32
    form: str = "shared"          # "none", "shared", "per_row", "bank"
    causal: bool = False
    padding: str = "none"         # "none", "left", "right", "full_row" (a row with every key padded)
    window: int | None = None
    softcap: float | None = None
    bias: str | None = None       # None, "full", "heads" (Hq, 1, P+Nk), "rows" (B, 1, 1, P+Nk)
    dropout_p: float = 0.0
    t: int = 3                    # bank size

    def id(self) -> str:
        parts = [f"b{self.b}h{self.hq}/{self.hkv}q{self.nq}k{self.nk}p{self.p}d{self.d}", self.form]
        parts += ["causal"] if self.causal else []
        parts += [f"pad-{self.padding}"] if self.padding != "none" else []
        parts += [f"win{self.window}"] if self.window else []
        parts += [f"cap{self.softcap}"] if self.softcap else []
        parts += [f"bias-{self.bias}"] if self.bias else []
        parts += [f"drop{self.dropout_p}"] if self.dropout_p else []
        return "-".join(parts)


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=None, requires_grad=True,
                grad_for=("q", "k", "v", "prefix_k", "prefix_v")):
    """Random inputs as float64 leaves (cast with ``cast``); returns a dict of keyword args."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    c = case
    inputs = {"q": rnd(c.b, c.hq, c.nq, c.d), "k": rnd(c.b, c.hkv, c.nk, c.d),
              "v": rnd(c.b, c.hkv, c.nk, c.d)}
    if c.form != "none":
        lead = {"shared": (), "per_row": (c.b,), "bank": (c.t,)}[c.form]
        inputs["prefix_k"] = rnd(*lead, c.hkv, c.p, c.d)
        inputs["prefix_v"] = rnd(*lead, c.hkv, c.p, c.d)
        if c.form == "bank":
            inputs["prefix_index"] = torch.randint(0, c.t, (c.b,), generator=gen)
    if c.padding != "none":
        mask = torch.ones(c.b, c.nk, dtype=torch.bool)
        n_pad = max(1, c.nk // 3)
        if c.padding == "left":
            mask[0, :n_pad] = False
        elif c.padding == "right":
            mask[-1, c.nk - n_pad:] = False
        elif c.padding == "full_row":
            mask[0, :] = False
            mask[-1, :n_pad] = False
        inputs["attention_mask"] = mask
    if c.bias:
        ptot = (c.p if c.form != "none" else 0) + c.nk
        shape = {"full": (c.b, c.hq, c.nq, ptot), "heads": (c.hq, 1, ptot),
                 "rows": (c.b, 1, 1, ptot)}[c.bias]
        inputs["attn_bias"] = rnd(*shape)
    for name in ("q", "k", "v", "prefix_k", "prefix_v"):
        if name in inputs and requires_grad and name in grad_for:
            inputs[name].requires_grad_(True)
    return inputs


def options(case: Case) -> dict:
    return {"causal": case.causal, "window": case.window, "softcap": case.softcap,
            "dropout_p": case.dropout_p}


def cast(inputs: dict, dtype, device="cpu") -> dict:
    """Detached copies in ``dtype`` on ``device``; float leaves keep their requires_grad."""
    out = {}
    for name, x in inputs.items():
        if x.dtype.is_floating_point:
            y = x.detach().to(device=device, dtype=dtype if name != "attn_bias" else
                              (torch.float32 if dtype != torch.float64 else dtype))
            out[name] = y.requires_grad_(x.requires_grad)
        else:
            out[name] = x.to(device)
    return out


def _grads(out, lse, inputs, grad_out, grad_lse):
    names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if n in inputs and inputs[n].requires_grad]
    if not names:
        return {}
    loss = (out.double() * grad_out).sum()
    if grad_lse is not None:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse.double(), 0) * grad_lse).sum()
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(inputs[n])) for n, g in zip(names, grads)}


def max_err(a, b):
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return diff.nan_to_num(nan=math.inf).max().item() if diff.numel() else 0.0


def run_reference(inputs, case, dropout_mask=None):
    kw = {k: v for k, v in inputs.items()}
    return reference_prefix_attention(**kw, **{k: v for k, v in options(case).items() if k != "dropout_p"},
                                      dropout_mask=dropout_mask, dropout_p=case.dropout_p)


def check_against_reference(case: Case, dtype, backend="eager", device="cpu", seed=None,
                            use_lse_grad=False, dropout_mask_fn=None, grad_for=None):
    """Run ``backend`` and the references on fresh inputs; assert the DESIGN.md error rule.

    ``dropout_mask_fn(seed_tensor, shape, p, prefix_len=P)`` recovers the backend's dropout keep-mask so the
    reference applies the very same mask. Returns the measured errors (for reporting).
    """
    base = make_inputs(case, seed=seed, **({"grad_for": grad_for} if grad_for else {}))
    opts = options(case)
    exact_in = cast(base, torch.float64)
    lowp_in = cast(base, dtype)
    kern_in = cast(base, dtype, device)

    dropout_mask = None
    torch.manual_seed(1234)
    if case.dropout_p > 0:
        from ptkernels.ops.prefix_attention import draw_dropout_seed
        seed_t = draw_dropout_seed()
        ptot = (case.p if case.form != "none" else 0) + case.nk
        dropout_mask = dropout_mask_fn(seed_t, (case.b, case.hq, case.nq, ptot), case.dropout_p,
                                       prefix_len=ptot - case.nk).cpu()
        torch.manual_seed(1234)
    out, lse = ptkernels.prefix_attention(**kern_in, **opts, return_lse=True, backend=backend)
    assert out.dtype == dtype and out.shape == (case.b, case.hq, case.nq, case.d)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(out).any(), "NaN in the output"

    out_x, lse_x = run_reference(exact_in, case, dropout_mask)
    out_l, lse_l = run_reference(lowp_in, case, dropout_mask)
    errors = {}
    e_k, e_l = max_err(out.cpu(), out_x), max_err(out_l, out_x)
    errors["out"] = (e_k, e_l)
    assert e_k <= FWD_FACTOR * e_l + ATOL[dtype], f"out: error {e_k:.3g} > {FWD_FACTOR} x {e_l:.3g} + {ATOL[dtype]}"
    e_k, e_l = max_err(lse.cpu(), lse_x), max_err(lse_l, lse_x)
    errors["lse"] = (e_k, e_l)
    assert e_k <= FWD_FACTOR * e_l + ATOL[dtype], f"lse: error {e_k:.3g} > {FWD_FACTOR} x {e_l:.3g} + {ATOL[dtype]}"

    gen = torch.Generator().manual_seed(99)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64) if use_lse_grad else None
    g_k = _grads(out.cpu() if device == "cpu" else out, lse, kern_in, grad_out.to(out.device), None if grad_lse is None else grad_lse.to(out.device))
    g_x = _grads(out_x, lse_x, exact_in, grad_out, grad_lse)
    g_l = _grads(out_l, lse_l, lowp_in, grad_out, grad_lse)
    for name in g_x:
        assert g_k[name].shape == exact_in[name].shape
        assert not torch.isnan(g_k[name]).any(), f"NaN in d{name}"
        e_k, e_l = max_err(g_k[name].cpu(), g_x[name]), max_err(g_l[name], g_x[name])
        errors["d" + name] = (e_k, e_l)
        atol = ATOL[dtype] * max(1.0, g_x[name].abs().max().item())
        assert e_k <= BWD_FACTOR * e_l + atol, \
            f"d{name}: error {e_k:.3g} > {BWD_FACTOR} x {e_l:.3g} + {atol:.3g}"
    return errors


# The shape list of DESIGN.md's correctness rules, as cases every backend runs.
CORE_CASES = [
    Case(p=0, form="none"),
    Case(p=1), Case(p=7), Case(p=64),
    Case(nq=1, nk=37, p=7, causal=True),
    Case(nq=37, nk=1, p=7),
    Case(nq=113, nk=203, p=7, d=64, causal=True),
    Case(nq=113, nk=203, p=64, d=80, padding="left"),
    Case(nq=37, nk=37, p=7, d=96, causal=True, padding="right"),
    Case(nq=37, nk=53, p=7, d=128, hq=4, hkv=1),                       # MQA
    Case(nq=29, nk=29, p=7, hq=6, hkv=2, causal=True, padding="left"),  # GQA
    Case(nq=17, nk=17, p=0, form="none", causal=True, padding="full_row"),  # rows with no key
    Case(nq=23, nk=9, p=0, form="none", causal=True),                   # Nq > Nk: empty causal rows
    Case(nq=23, nk=9, p=5, causal=True),                                # ... kept alive by the prefix
    Case(nq=19, nk=31, p=7, form="per_row", causal=True, padding="right"),
    Case(nq=19, nk=31, p=7, form="bank", b=3, t=4, padding="left"),
    Case(nq=19, nk=31, p=64, form="bank", b=4, t=2, causal=True),
    Case(nq=21, nk=33, p=7, causal=True, window=8),
    Case(nq=21, nk=33, p=7, causal=True, window=4, padding="left"),
    Case(nq=21, nk=21, p=7, softcap=5.0, causal=True),
    Case(nq=21, nk=25, p=7, bias="full"),
    Case(nq=21, nk=25, p=7, bias="heads", causal=True),
    Case(nq=21, nk=25, p=7, bias="rows", form="bank", padding="right"),
    Case(nq=16, nk=16, p=7, softcap=3.0, bias="heads", window=5, causal=True, padding="left",
         form="per_row"),
]


# ----------------------------------------------------------------------------------------------
# Forward-only checks of a raw backend forward (before its backward exists, or for a second
# forward path such as the Triton decode kernel)
# ----------------------------------------------------------------------------------------------

def normalized_args(inputs: dict, case: Case, dropout_seed=None) -> tuple:
    """The positional arguments a backend's ``prefix_attention_fwd`` receives for ``inputs``.

    Mirrors the normalization of ``ptkernels.ops.prefix_attention``: prefix as (T, Hkv, P, D)
    (None when there is none), bool key padding mask, bias expanded to (B, Hq, Nq, P + Nk) (a
    stride-0 view, not a copy), window -1 / softcap 0.0 for "none", default scale D ** -0.5.
    """
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    pk, pv, idx = inputs.get("prefix_k"), inputs.get("prefix_v"), inputs.get("prefix_index")
    if pk is not None and pk.dim() == 3:
        pk, pv = pk.unsqueeze(0), pv.unsqueeze(0)
    p = 0 if pk is None else pk.shape[2]
    mask = inputs.get("attention_mask")
    mask = None if mask is None else mask != 0
    bias = inputs.get("attn_bias")
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], p + k.shape[2])
    seed = dropout_seed if case.dropout_p > 0 else None
    return (q, k, v, pk, pv, idx, mask, bias, seed, case.causal,
            -1 if case.window is None else case.window,
            0.0 if case.softcap is None else float(case.softcap), q.shape[-1] ** -0.5,
            float(case.dropout_p))


def check_forward_against_reference(case: Case, dtype, fwd_fn, device="cpu", seed=None,
                                    dropout_mask_fn=None, inputs=None, transform=None):
    """Run a raw forward ``fwd_fn`` (backend signature) and judge out and lse by DESIGN.md's rule.

    ``transform(name, tensor) -> tensor`` may change the layout of the kernel's inputs (e.g.
    non-contiguous views) without changing values. Returns ``(out, lse, errors)``.
    """
    base = inputs if inputs is not None else make_inputs(case, seed=seed, requires_grad=False)
    exact_in, lowp_in, kern_in = cast(base, torch.float64), cast(base, dtype), cast(base, dtype, device)
    if transform is not None:
        kern_in = {n: transform(n, x) for n, x in kern_in.items()}
    dropout_seed = dropout_mask = None
    if case.dropout_p > 0:
        from ptkernels.ops.prefix_attention import draw_dropout_seed
        dropout_seed = draw_dropout_seed()
        ptot = (case.p if case.form != "none" else 0) + case.nk
        dropout_mask = dropout_mask_fn(dropout_seed, (case.b, case.hq, case.nq, ptot),
                                       case.dropout_p, prefix_len=ptot - case.nk).cpu()
    out, lse = fwd_fn(*normalized_args(kern_in, case, dropout_seed))
    assert out.dtype == dtype and out.shape == (case.b, case.hq, case.nq, case.d)
    assert lse.dtype == torch.float32 and lse.shape == (case.b, case.hq, case.nq)
    assert not torch.isnan(out).any(), "NaN in the output"
    assert not torch.isnan(lse).any(), "NaN in the lse"
    out_x, lse_x = run_reference(exact_in, case, dropout_mask)
    out_l, lse_l = run_reference(lowp_in, case, dropout_mask)
    errors = {}
    for name, got, exact, lowp in (("out", out, out_x, out_l), ("lse", lse, lse_x, lse_l)):
        e_k, e_l = max_err(got.cpu(), exact), max_err(lowp, exact)
        errors[name] = (e_k, e_l)
        assert e_k <= FWD_FACTOR * e_l + ATOL[dtype], \
            f"{name}: error {e_k:.3g} > {FWD_FACTOR} x {e_l:.3g} + {ATOL[dtype]}"
    return out, lse, errors
