"""The public ``patch_model`` / ``unpatch_model``: pick the path (PEFT model, prompt config, or
attention only) and undo exactly what it did.

Layers of ``ptkernels.integrations`` (imports point down this list only):
``state`` (patch state, per-call prefix context) <- ``transformers`` (the attention and mask
functions) <- ``architectures`` (the registry) <- ``checkpointing``, ``patching`` (attention only)
<- {``peft`` (the PEFT path), ``prompt_attach`` (the config path)} <- ``adapters`` (files), this
module.
"""
from __future__ import annotations

from ptkernels.integrations.patching import patch_base
from ptkernels.integrations.peft import is_peft_model, patch_peft_model, unpatch_peft_model
from ptkernels.integrations.prompt_attach import patch_with_prompts, undo_prompts
from ptkernels.integrations.state import get_state


def patch_model(model, config=None, *, backend: str = "auto"):
    """Route a transformers (or PEFT) model's attention through ptkernels; returns the model.

    ``config`` None: outputs equal the unpatched model. A PEFT prompt-learning model keeps its own
    prompts (see ``ptkernels.integrations.peft``). A prompt config attaches ptkernels' prompts
    (``prompt_attach``). All-or-nothing: on error the model is unchanged.
    """
    if is_peft_model(model):
        if config is not None:
            raise ValueError("patch_model(peft_model) uses the PEFT model's own prompt config; "
                             "pass config=None")
        return patch_peft_model(model, backend=backend)
    if config is not None:
        return patch_with_prompts(model, config, backend=backend)
    patch_base(model, backend=backend)
    return model


def unpatch_model(model):
    """Undo ``patch_model`` exactly (attention implementation, forwards, hooks, prompt parameters)."""
    if is_peft_model(model):
        return unpatch_peft_model(model)
    state = get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by ptkernels")
    undo_prompts(model, state)
    return model
