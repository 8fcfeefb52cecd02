"""Eager GPC cell: the reference math and the CPU path of ``ptkernels.gpc_cell``.

``X = [U, S]`` (B, m, 2d); ``a = X @ W + b`` (B, m, n_gates * d), gate blocks in the order
below; the epilogue combines the gates with U and S. Variants (``reference/methods.md`` 3.3):

============  =======  ===================================================
variant       gates    new state
============  =======  ===================================================
"lstm"        f, r     sigmoid(a_f) * S + sigmoid(a_r) * U       (default)
"candidate"   f, r, c  sigmoid(a_f) * S + sigmoid(a_r) * tanh(a_c)
"gru"         g        sigmoid(a_g) * U + (1 - sigmoid(a_g)) * S
"reinject"    f, r     sigmoid(a_f) * U + sigmoid(a_r) * S   (S = the original prompt)
============  =======  ===================================================
"""
from __future__ import annotations

import torch

GATES = {"lstm": 2, "candidate": 3, "gru": 1, "reinject": 2}


def num_gates(variant: str) -> int:
    try:
        return GATES[variant]
    except KeyError:
        raise ValueError(f"variant must be one of {sorted(GATES)}, got {variant!r}") from None


def gate_epilogue(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, variant: str) -> torch.Tensor:
    """New state from pre-activations ``a`` (..., n_gates * d) and U, S (..., d)."""
    d = u.shape[-1]
    if variant == "lstm":
        return torch.sigmoid(a[..., :d]) * s + torch.sigmoid(a[..., d:]) * u
    if variant == "candidate":
        return torch.sigmoid(a[..., :d]) * s + torch.sigmoid(a[..., d:2 * d]) * torch.tanh(a[..., 2 * d:])
    if variant == "gru":
        g = torch.sigmoid(a)
        return g * u + (1 - g) * s
    if variant == "reinject":
        return torch.sigmoid(a[..., :d]) * u + torch.sigmoid(a[..., d:]) * s
    num_gates(variant)
    raise AssertionError("unreachable")


def gate_epilogue_backward(g: torch.Tensor, a: torch.Tensor, u: torch.Tensor, s: torch.Tensor,
                           variant: str):
    """Given dL/dS' = g, return (dL/da, direct dL/dU, direct dL/dS) of the epilogue."""
    d = u.shape[-1]
    if variant == "gru":
        gt = torch.sigmoid(a)
        return g * (u - s) * gt * (1 - gt), g * gt, g * (1 - gt)
    f, r = torch.sigmoid(a[..., :d]), torch.sigmoid(a[..., d:2 * d])
    if variant == "lstm":
        return torch.cat([g * s * f * (1 - f), g * u * r * (1 - r)], -1), g * r, g * f
    if variant == "reinject":
        return torch.cat([g * u * f * (1 - f), g * s * r * (1 - r)], -1), g * f, g * r
    if variant == "candidate":
        c = torch.tanh(a[..., 2 * d:])
        da = torch.cat([g * s * f * (1 - f), g * c * r * (1 - r), g * r * (1 - c * c)], -1)
        return da, torch.zeros_like(u), g * f
    num_gates(variant)
    raise AssertionError("unreachable")


def reference_gpc_cell(update, state, weight, bias, variant="lstm"):
    """Plain math in the inputs' dtype (cast to float64 for the exact reference)."""
    s = state.expand_as(update)
    a = torch.cat([update, s], -1) @ weight + bias
    return gate_epilogue(a, update, s, variant)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def gpc_cell_fwd(update, state, weight, bias, variant):
    acc = _acc(update.dtype)
    u = update.to(acc)
    s = state.to(acc).expand_as(u)
    a = torch.addmm(bias.to(acc), torch.cat([u, s], -1).reshape(-1, 2 * u.shape[-1]),
                    weight.to(acc)).view(*u.shape[:-1], -1)
    return gate_epilogue(a, u, s, variant).to(update.dtype).contiguous(), a.contiguous()


def gpc_cell_bwd(grad_new_state, update, state, weight, bias, preact, variant, output_mask):
    need_du, need_ds, need_dw, need_db = (bool(x) for x in output_mask)
    acc = _acc(update.dtype)
    d = update.shape[-1]
    u = update.to(acc)
    s = state.to(acc).expand_as(u)
    da, du, ds = gate_epilogue_backward(grad_new_state.to(acc), preact.to(acc), u, s, variant)
    da2 = da.reshape(-1, da.shape[-1])
    # unneeded gradients are distinct empty tensors: a custom op's outputs must not alias
    grad_u, grad_s, grad_w, grad_b = (update.new_empty(0) for _ in range(4))
    if need_du or need_ds:
        dx = (da2 @ weight.to(acc).t()).view(*u.shape[:-1], 2 * d)
        if need_du:
            grad_u = (du + dx[..., :d]).to(update.dtype).contiguous()
        if need_ds:
            gs = ds + dx[..., d:]
            if state.dim() < update.dim():  # a state shared by the batch: reduce over it
                gs = gs.sum(0)
            grad_s = gs.to(state.dtype).contiguous()
    if need_dw:
        x = torch.cat([u, s], -1).reshape(-1, 2 * d)
        grad_w = (x.t() @ da2).to(weight.dtype).contiguous()
    if need_db:
        grad_b = da2.sum(0).to(bias.dtype).contiguous()
    return grad_u, grad_s, grad_w, grad_b
