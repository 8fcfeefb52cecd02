"""Activation checkpointing that recomputes a layer with the prefix of the forward it recomputes.

transformers' ``GradientCheckpointingLayer`` checkpoints ``forward`` through the layer's
``_gradient_checkpointing_func(partial(forward, self, **kwargs), *args)``; the recomputation runs
inside backward, after the forward call (and its ``PrefixContext``) has ended, possibly after other
forwards (gradient accumulation, R-Drop). ``ContextCheckpoint`` wraps that function so the
checkpointed callable carries the context that was active when the layer ran forward: any number
of forwards before one backward give exact gradients, on any thread.

The wrapper is (re)installed on every forward of a model with prompts (``ensure``), so enabling
gradient checkpointing after ``patch_model`` works too; ``unwrap`` restores the originals.
"""
from __future__ import annotations

from ptkernels.integrations.state import ContextBound, PatchState, current


class ContextCheckpoint:
    """``checkpoint(function, *args)`` with ``function`` bound to the active prefix context."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, function, *args, **kwargs):
        ctx = current()
        if ctx is not None:
            function = ContextBound(function, ctx)
        return self.inner(function, *args, **kwargs)


def checkpoint_layers(model) -> list:
    """The modules of ``model`` whose forward transformers checkpoints."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def ensure(state: PatchState) -> None:
    """Wrap every layer's checkpoint function that is not wrapped yet (cheap when all are)."""
    for layer in state.checkpoint_layers:
        fn = layer.__dict__.get("_gradient_checkpointing_func")
        if fn is not None and not isinstance(fn, ContextCheckpoint):
            layer.__dict__["_gradient_checkpointing_func"] = ContextCheckpoint(fn)


def unwrap(state: PatchState) -> None:
    for layer in state.checkpoint_layers:
        fn = layer.__dict__.get("_gradient_checkpointing_func")
        while isinstance(fn, ContextCheckpoint):
            fn = fn.inner
        if fn is not None:
            layer.__dict__["_gradient_checkpointing_func"] = fn
