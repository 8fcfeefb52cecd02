"""``ptkernels.gpc_cell``: the Global Prompt Cell's gated update, as a custom op with autograd.

``[a_f, a_r] = [U, S] @ weight + bias``; variant "lstm": ``S' = sigmoid(a_f) * S + sigmoid(a_r) * U``
(other variants: ``ptkernels/backends/eager_gpc.py``). One GEMM with a gating epilogue; the
forward also returns the float32 pre-activations (B, m, n_gates * d), which the backward reuses.
"""
from __future__ import annotations

import torch

from ptkernels import backends
from ptkernels.backends.eager_gpc import num_gates
from ptkernels.ops._kernel_entries import define_kernel_entry
from ptkernels.ops._validate import require_float, require_same, require_tensor, shape_str


@torch.library.custom_op("ptkernels::gpc_cell_fwd", mutates_args=())
def _fwd_op(update: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            variant: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(backends.get(backend).gpc_cell_fwd(update, state, weight, bias, variant))


@_fwd_op.register_fake
def _fwd_fake(update, state, weight, bias, variant, backend):
    acc = torch.float64 if update.dtype == torch.float64 else torch.float32
    return (update.new_empty(update.shape),
            update.new_empty((*update.shape[:-1], weight.shape[1]), dtype=acc))


@torch.library.custom_op("ptkernels::gpc_cell_bwd", mutates_args=())
def _bwd_op(grad_new_state: torch.Tensor, update: torch.Tensor, state: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor, preact: torch.Tensor, variant: str,
            output_mask: list[bool], backend: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(backends.get(backend).gpc_cell_bwd(grad_new_state, update, state, weight, bias,
                                                    preact, variant, list(output_mask)))


@_bwd_op.register_fake
def _bwd_fake(grad_new_state, update, state, weight, bias, preact, variant, output_mask, backend):
    return tuple(x.new_empty(x.shape) if need else update.new_empty(0)
                 for x, need in zip((update, state, weight, bias), output_mask))


def _setup_context(ctx, inputs, output):
    update, state, weight, bias, variant, backend = inputs
    ctx.save_for_backward(update, state, weight, bias, output[1])
    ctx.options = (variant, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_new_state, grad_preact):
    update, state, weight, bias, preact = ctx.saved_tensors
    variant, backend = ctx.options
    mask = [bool(x) for x in ctx.needs_input_grad[:4]]
    if grad_new_state is None or not any(mask):
        return (None,) * 6
    grads = _bwd_op(grad_new_state, update, state, weight, bias, preact, variant, mask, backend)
    return tuple(g if need else None for g, need in zip(grads, mask)) + (None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)

# The CUDA library's kernel entries: the same schemas without ``backend`` (see _kernel_entries).
FWD_KERNEL = define_kernel_entry(_fwd_op, _fwd_fake)
BWD_KERNEL = define_kernel_entry(_bwd_op, _bwd_fake)


def gpc_cell(update, state, weight, bias, *, variant="lstm", backend="auto"):
    """The Global Prompt Cell's gated state update for the prompt rows of one layer.

    Args:
        update: U (B, m, d), the prompt rows after a layer.
        state: S (B, m, d), or (m, d) shared by the batch.
        weight: (2d, n_gates * d); bias: (n_gates * d,). n_gates = 2 for "lstm" and "reinject",
            3 for "candidate", 1 for "gru".
        variant: "lstm" (default), "candidate", "gru" or "reinject".
        backend: "auto", "eager", "triton" or "cuda".

    Returns:
        the new state S' (B, m, d) in update's dtype. An empty batch (B == 0 or m == 0) gives an
        empty result without running a kernel.
    """
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a string, one of 'lstm', 'candidate', 'gru', 'reinject'; "
                        f"got {type(variant).__name__}")
    n = num_gates(variant)
    require_tensor("update", update, 3, "(B, m, d)")
    require_float("update", update)
    b, m, d = update.shape
    require_tensor("state", state, (2, 3), "(B, m, d) or (m, d)")
    if tuple(state.shape[-2:]) != (m, d) or (state.dim() == 3 and state.shape[0] != b):
        raise ValueError(f"state must have shape (B, m, d) = ({b}, {m}, {d}) or (m, d) = ({m}, {d}), "
                         f"got {shape_str(state)}")
    require_tensor("weight", weight, 2, f"(2d, {n}d)")
    if tuple(weight.shape) != (2 * d, n * d):
        raise ValueError(f"weight must have shape (2d, {n}d) = ({2 * d}, {n * d}) for variant "
                         f"{variant!r}, got {shape_str(weight)}")
    require_tensor("bias", bias, 1, f"({n}d,)")
    if tuple(bias.shape) != (n * d,):
        raise ValueError(f"bias must have shape ({n}d,) = ({n * d},) for variant {variant!r}, "
                         f"got {shape_str(bias)}")
    for name, x in (("state", state), ("weight", weight), ("bias", bias)):
        require_same(name, x, "update", update)
    if d == 0:
        raise ValueError(f"update must have a hidden size d >= 1, got shape {shape_str(update)}")
    name = backends.resolve("gpc_cell", update.device, backend)
    if update.dtype == torch.float64 and name != "eager":
        raise TypeError(f"float64 inputs run only on the eager backend, not {name!r}")
    if b == 0 or m == 0:   # nothing to gate (kernels would launch an empty grid)
        return update * 0 + (state * 0).sum() * 0
    return _fwd_op(update, state, weight, bias, variant, name)[0]
