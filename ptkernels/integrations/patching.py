"""Route a transformers model's attention through ptkernels (no prompts): ``patch_base`` and its
exact inverse ``undo``. The PEFT path and the config path build on this.

``patch_base`` looks the model up in the architecture registry, switches the attention
implementation to ``"ptkernels"`` (or replaces a bespoke attention class's ``forward``), gives
every attention module its ``Binding`` (site, layer), installs the architecture's position hooks
and a guard against ``output_attentions``, and records all of it in the ``PatchState``.
All-or-nothing: on error everything done so far is undone.
"""
from __future__ import annotations

import gc
from typing import Optional

from ptkernels.backends import BACKENDS
from ptkernels.integrations import architectures, checkpointing
from ptkernels.integrations.architectures.base import PositionHook
from ptkernels.integrations.state import (Binding, PatchState, add_hook, bind, get_state,
                                          remove_hooks, set_state, unbind_all)
from ptkernels.integrations.transformers import ATTN_NAME, register

BACKEND_NAMES = ("auto",) + tuple(BACKENDS)


class BespokeForward:
    """An attention module's replacement ``forward`` (instance attribute): ``function(module,
    ...)``. A callable object holding its module, so a deep copy of the model copies it."""

    def __init__(self, function, module):
        self.function, self.module = function, module

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)


class RefuseAttentionWeights:
    """Forward pre-hook on the patched model: ptkernels never materializes attention
    probabilities, so ``output_attentions=True`` is an error (not an empty tuple)."""

    def __call__(self, module, args, kwargs):
        if kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False):
            raise ValueError("output_attentions=True: ptkernels never materializes attention "
                             "probabilities; call ptkernels.unpatch_model(model) (eager attention) "
                             "to inspect them")
        return None


def check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {BACKEND_NAMES}, got "
                        f"{type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def check_model(model):
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch_model expects a transformers PreTrainedModel or a PEFT model, got "
                        f"{type(model).__name__}")


def peft_owner(model) -> Optional[str]:
    """The peft_type of a PEFT prompt-learning model wrapping ``model`` as its base, if any (its
    prompts would be applied on top of ptkernels' own). Found through the garbage collector's
    referrers: the wrapper's ``_modules`` dict holds ``model`` and its instance dict holds that."""
    for modules in gc.get_referrers(model):
        if not isinstance(modules, dict) or modules.get("base_model") is not model:
            continue
        for inst in gc.get_referrers(modules):
            if isinstance(inst, dict) and inst.get("_modules") is modules and \
                    inst.get("_is_prompt_learning"):
                return str(getattr(inst.get("peft_type"), "value", inst.get("peft_type")))
    return None


def _validate(model, arch) -> dict:
    if get_state(model) is not None:
        raise ValueError(f"{type(model).__name__} is already patched by ptkernels "
                         "(call ptkernels.unpatch_model first)")
    sites = arch.attention_modules(model)
    if not sites:
        raise ValueError(f"{type(model).__name__}: no attention modules of class "
                         f"{'/'.join(arch.attention)} found")
    for site, mods in sites.items():
        expected = arch.num_layers(model.config, site)
        if len(mods) != expected:
            raise ValueError(f"{type(model).__name__}: found {len(mods)} {site} attention modules, "
                             f"its config has {expected} layers")
    if arch.bespoke_forward is None and not type(model)._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation "
                         "(set_attn_implementation is not supported by this class)")
    if getattr(model.config, "output_attentions", False):
        raise ValueError("patch_model: config.output_attentions=True needs eager attention "
                         "(ptkernels never materializes attention probabilities)")
    return sites


def patch_base(model, *, backend: str = "auto", allow_peft_owner: bool = False) -> PatchState:
    """Route ``model``'s attention through ptkernels (no prompts). All-or-nothing."""
    check_model(model)
    check_backend(backend)
    arch = architectures.lookup(model)
    sites = _validate(model, arch)
    if not allow_peft_owner:
        owner = peft_owner(model)
        if owner is not None:
            raise ValueError(
                f"{type(model).__name__} is the base model of a PEFT {owner} model, which adds "
                "its own prompts: patch the PEFT model itself (ptkernels.patch_model(peft_model)), "
                "not its base model")
    state = PatchState(arch=arch, backend=backend, sites=sites,
                       original_impl=model.config._attn_implementation)
    try:
        if arch.bespoke_forward is not None:
            for mods in sites.values():
                for mod in mods:
                    mod.__dict__["forward"] = BespokeForward(arch.bespoke_forward, mod)
                    state.bespoke.append(mod)
        else:
            register()
            state.switched_impl = True
            model.set_attn_implementation(ATTN_NAME)
            if model.config._attn_implementation != ATTN_NAME:
                raise ValueError(f"{type(model).__name__}: set_attn_implementation did not switch "
                                 "to ptkernels")
            _switch_submodels(model, state)
        for site, mods in sites.items():
            for i, mod in enumerate(mods):
                bind(mod, Binding(state, site, i, arch.bind_extra(model, site, i, mod)))
        install_position_hooks(model, state)
        # generate() calls an encoder-decoder's encoder directly: guard it too
        guarded = [model] + ([model.get_encoder()] if arch.is_encoder_decoder else [])
        for target in guarded:
            handle = target.register_forward_pre_hook(RefuseAttentionWeights(), with_kwargs=True)
            add_hook(state, target, handle, "_forward_pre_hooks")
        state.checkpoint_layers = checkpointing.checkpoint_layers(model)
        set_state(model, state)
    except BaseException:
        undo(model, state)
        raise
    return state


def _switch_submodels(model, state: PatchState) -> None:
    """Sub-models with a config of their own (T5's encoder/decoder stacks) that the parent's
    ``set_attn_implementation`` did not switch (transformers releases before 5.18 do not recurse)."""
    from transformers import PreTrainedModel
    for sub in model.modules():
        if sub is model or not isinstance(sub, PreTrainedModel):
            continue
        impl = sub.config._attn_implementation
        if impl != ATTN_NAME:
            state.switched_submodels.append((sub, impl))
            sub.config._attn_implementation = ATTN_NAME


def install_position_hooks(model, state: PatchState) -> None:
    if state.arch.position_hooks is None:
        return
    for target, site, shift in state.arch.position_hooks(model):
        handle = target.register_forward_pre_hook(PositionHook(site, shift), with_kwargs=True)
        add_hook(state, target, handle, "_forward_pre_hooks")


def undo(model, state: PatchState) -> None:
    """Undo what ``state`` records (safe on a partially built state)."""
    remove_hooks(state)
    checkpointing.unwrap(state)
    while state.bespoke:
        state.bespoke.pop().__dict__.pop("forward", None)
    if state.switched_impl:
        model.set_attn_implementation(state.original_impl)
        state.switched_impl = False
    while state.switched_submodels:
        sub, impl = state.switched_submodels.pop()
        sub.config._attn_implementation = impl
    unbind_all(state)
    if get_state(model) is state:
        set_state(model, None)
