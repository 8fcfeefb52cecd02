"""The patch state of a patched model and the per-call prefix context (the bottom of
``ptkernels.integrations``: it imports nothing else from the package).

* ``PatchState`` (one per patched model, ``model._ptkernels_state``): what ``patch_model`` changed,
  in typed fields, so that ``unpatch_model`` can undo exactly that. Everything that refers to the
  model's modules is a plain attribute (never a closure), so ``copy.deepcopy(model)`` copies it
  consistently: the copy's state refers to the copy's modules.
* ``Binding`` (``module._ptkernels_binding`` on every attention module): which state, site and
  layer index the attention function is running for.
* ``PrefixContext``: the prefixes (and per-call Global Prompt Cell rows) of ONE forward call. It
  lives in a ``contextvars.ContextVar``, so concurrent forwards from several threads each see their
  own; whoever owns the prompts (the config path's forward, the PEFT path's forward) sets it for
  the duration of the call with ``use_context``. Activation checkpointing recomputes layers inside
  backward, after that call returned: ``ptkernels.integrations.checkpointing`` binds the forward's
  context into each checkpointed call, so the recomputation sees exactly the forward's prefix.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Optional

import torch

STATE_ATTR = "_ptkernels_state"
BINDING_ATTR = "_ptkernels_binding"


@dataclasses.dataclass
class GPCRun:
    """The Global Prompt Cell's rows during one forward call.

    ``cell``: the ``GlobalPromptCell``; ``rows``: m, the prompt rows at the front of the sequence;
    ``original``: the prompts as fed to the first layer (B, m, d); ``states``: {layer index: S
    after that layer}."""
    cell: torch.nn.Module
    rows: int
    original: torch.Tensor
    states: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PrefixContext:
    """The prefixes of one forward call.

    ``prefixes``: {site: (K, V)} with K, V indexable by layer, each layer's entry (T, Hkv, P, D)
    (e.g. stacked tensors (L, T, Hkv, P, D)). ``prefix_index``: (B,) int64 task ids when T > 1.
    ``position_offset``: real tokens at positions P..P+n-1 (PEFT convention) when True.
    ``gpc``: the Global Prompt Cell's per-call rows (prompt tuning with a GPC).
    ``capture``: when a dict, the attention function records each layer's own keys/values of
    batch row 0 there, {(site, layer): (K (Hkv, n, D), V)} (``capture_kv``).
    """
    prefixes: dict = dataclasses.field(default_factory=dict)
    prefix_index: Optional[torch.Tensor] = None
    position_offset: bool = True
    gpc: Optional[GPCRun] = None
    capture: Optional[dict] = None

    def layer(self, site: str, layer: int):
        entry = self.prefixes.get(site)
        if entry is None:
            return None
        k, v = entry
        return k[layer], v[layer]

    def length(self, site: str) -> int:
        entry = self.prefixes.get(site)
        return 0 if entry is None else int(entry[0].shape[-2])

    def offset(self, site: str) -> int:
        return self.length(site) if self.position_offset else 0


_CURRENT: contextvars.ContextVar[Optional[PrefixContext]] = contextvars.ContextVar(
    "ptkernels_prefix_context", default=None)


# Contexts of calls that torch.compile traces. Dynamo cannot trace ContextVar.set(), so while
# compiling the context goes on this list instead. Tracing reads it (in the compiled graph the
# prefix tensors flow into the attention ops as graph values, so concurrent compiled calls each
# use their own prefixes), and so does the eager code between two graphs when a compiled call
# has a graph break inside the block (Dynamo replays the append there). Known limit: during such
# a graph-broken compiled call, an eager forward of another thread would see this context.
_TRACED: list = []


def current() -> Optional[PrefixContext]:
    """The prefix context of the call in progress in this thread / task (None outside one)."""
    if _TRACED:
        return _TRACED[-1]
    return _CURRENT.get()


@contextlib.contextmanager
def use_context(ctx: Optional[PrefixContext]):
    """Make ``ctx`` the active prefix context for the duration of the block (this thread only)."""
    if torch.compiler.is_compiling():
        _TRACED.append(ctx)
        try:
            yield ctx
        finally:
            _TRACED.pop()
        return
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


class ContextBound:
    """``function`` run with ``ctx`` as the active prefix context (what a checkpointed layer
    call carries into its recomputation)."""

    def __init__(self, function: Callable, ctx: PrefixContext):
        self.function, self.ctx = function, ctx

    def __call__(self, *args, **kwargs):
        with use_context(self.ctx):
            return self.function(*args, **kwargs)


@dataclasses.dataclass
class PatchState:
    """What ``patch_model`` did to one model (``unpatch_model`` undoes exactly this).

    ``arch``: the registry entry (``architectures.Architecture``). ``sites``: {site: [attention
    modules in layer order]}. ``backend``: the backend name every attention call requests.
    """
    arch: Any
    backend: str
    sites: dict
    original_impl: Optional[str] = None
    switched_impl: bool = False                 # set_attn_implementation("ptkernels") was called
    switched_submodels: list = dataclasses.field(default_factory=list)   # [(sub-model, its impl)]
    bespoke: list = dataclasses.field(default_factory=list)   # modules with a replaced forward
    bound: list = dataclasses.field(default_factory=list)     # modules carrying a Binding
    hooks: list = dataclasses.field(default_factory=list)     # (module, hook dict name, hook id)
    checkpoint_layers: list = dataclasses.field(default_factory=list)
    # the config path (patch_model(model, config))
    prompts: Optional[torch.nn.Module] = None   # model.ptk_prompts
    spec: Any = None                            # ptkernels.prompts.ModelSpec
    flags: Optional[dict] = None                # requires_grad before patching, by name
    heads: tuple = ()                           # task heads left trainable
    wrapped_forward: bool = False               # model.__dict__["forward"] is ours
    previous_forward: Any = None                # an instance forward the model had before
    encoder: Any = None                         # encoder-decoder: the encoder given an EncoderForward
    previous_encoder_forward: Any = None        # the instance forward that encoder had before
    # the PEFT path (patch_model(peft_model))
    peft_kind: Optional[str] = None

    @property
    def owns_prefix(self) -> bool:
        """Whether forwards of this model carry a prefix context (prompts attached)."""
        return self.prompts is not None or self.peft_kind is not None


@dataclasses.dataclass
class Binding:
    """An attention module's place in a patched model. ``extra``: what the architecture's
    callables need for this module (e.g. T5's relative-bias module of the site)."""
    state: PatchState
    site: str
    layer: int
    extra: Any = None


def get_state(model) -> Optional[PatchState]:
    """The patch state of ``model`` (None when it is not patched by ptkernels)."""
    return getattr(model, "__dict__", {}).get(STATE_ATTR)


def set_state(model, state: Optional[PatchState]) -> None:
    if state is None:
        model.__dict__.pop(STATE_ATTR, None)
    else:
        model.__dict__[STATE_ATTR] = state


def binding_of(module) -> Optional[Binding]:
    return module.__dict__.get(BINDING_ATTR)


def bind(module, binding: Binding) -> None:
    module.__dict__[BINDING_ATTR] = binding
    binding.state.bound.append(module)


def add_hook(state: PatchState, module, handle, kind: str) -> None:
    """Record a hook registered on ``module`` (``kind``: the module's hook dict attribute, e.g.
    ``_forward_pre_hooks``). Removal goes through the module's own dict, not the handle, so a
    deep copy of the model removes its own hooks."""
    state.hooks.append((module, kind, handle.id))


def remove_hooks(state: PatchState) -> None:
    while state.hooks:
        module, kind, hook_id = state.hooks.pop()
        getattr(module, kind).pop(hook_id, None)
        getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(hook_id, None)
        getattr(module, "_forward_hooks_with_kwargs", {}).pop(hook_id, None)
        getattr(module, "_forward_hooks_always_called", {}).pop(hook_id, None)


def unbind_all(state: PatchState) -> None:
    while state.bound:
        module = state.bound.pop()
        if module.__dict__.get(BINDING_ATTR) is not None and \
                module.__dict__[BINDING_ATTR].state is state:
            del module.__dict__[BINDING_ATTR]
