"""The ptkernels adapter directory: everything a config-path model trained, in a versioned file
pair that PEFT's adapter format cannot replace (prefix banks, Global Prompt Cells, encoder and
cross-attention prefixes, the MLP reparameterization's own weights, seq2seq prompt tuning).

Files (``prompt_files.py`` writes them, atomically, next to PEFT's pair when PEFT can also
represent the prompts):

* ``ptkernels_adapter.json``: ``{"format": "ptkernels-prompts", "version": 1, "model_type",
  "config_class", "config": the prompt config's fields, "heads": trainable task heads,
  "tensors": {name: shape}}``;
* ``ptkernels_adapter.safetensors``: ``prompts.<name>`` = ``model.ptk_prompts.state_dict()``,
  ``heads.<module>.<param>`` = the trained task heads (P-Tuning v2).

``load(model, directory)`` restores them into a model patched with the same config, or patches an
unpatched model with the saved config first (``from_pretrained`` + ``load_prompts`` is the whole
restore). Everything is checked before anything is written; on error the model is unchanged.
"""
from __future__ import annotations

import torch

from ptkernels.integrations import prompt_files
from ptkernels.integrations.prompt_files import (CONFIG_NAME, FORMAT, VERSION, WEIGHTS_NAME,
                                                 config_to_json)


def config_from_json(meta: dict):
    from ptkernels.prompts.configs import (GPCConfig, PrefixTuningConfig, PromptTuningConfig,
                                           PTuningV2Config)
    classes = {c.__name__: c for c in (PrefixTuningConfig, PTuningV2Config, PromptTuningConfig)}
    name = meta.get("config_class")
    if name not in classes or not isinstance(meta.get("config"), dict):
        raise ValueError(f"ptkernels adapter: unknown prompt config class {name!r}")
    fields = dict(meta["config"])
    if isinstance(fields.get("gpc"), dict):
        fields["gpc"] = GPCConfig(**fields["gpc"])
    try:
        return classes[name](**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"ptkernels adapter: invalid {name} fields {fields}: {e}") from e


def read(directory) -> tuple[dict, dict]:
    cfg_path, w_path = prompt_files.pair_paths(directory, CONFIG_NAME, WEIGHTS_NAME,
                                               "ptkernels adapter")
    meta = prompt_files.read_json(cfg_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a ptkernels adapter (format != {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{cfg_path} has ptkernels adapter version {meta.get('version')!r}; this "
                         f"ptkernels reads version {VERSION}")
    tensors = prompt_files.read_tensors(w_path)
    listed = {k: tuple(v) for k, v in meta.get("tensors", {}).items()}
    if listed != {k: tuple(v.shape) for k, v in tensors.items()}:
        raise ValueError(f"{w_path} does not hold the tensors {cfg_path} lists")
    for name, value in tensors.items():
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{w_path}: tensor {name!r} holds NaN or infinite values")
    return meta, tensors


def load(model, directory) -> None:
    """Restore the adapter in ``directory`` into ``model`` (patching it first if unpatched)."""
    from ptkernels.integrations.prompt_attach import patch_with_prompts, undo_prompts
    from ptkernels.integrations.state import get_state
    meta, tensors = read(directory)
    if meta.get("model_type") != model.config.model_type:
        raise ValueError(f"the adapter in {directory} was trained on model_type="
                         f"{meta.get('model_type')!r}, this model is {model.config.model_type!r}")
    config = config_from_json(meta)
    state = get_state(model)
    patched_here = state is None
    if patched_here:
        patch_with_prompts(model, config, backend="auto")
        state = get_state(model)
    try:
        _load_into(model, state, config, meta, tensors, directory)
    except BaseException:
        if patched_here:
            undo_prompts(model, state)
        raise


def _load_into(model, state, config, meta, tensors, directory):
    module = state.prompts
    if module is None:
        raise ValueError(f"{type(model).__name__} is patched without prompts; patch it with the "
                         f"adapter's config ({meta['config_class']}) or pass an unpatched model")
    if config_to_json(module.config) != config_to_json(config):
        raise ValueError(f"the adapter in {directory} holds {config!r}; this model was patched with "
                         f"{module.config!r}")
    mine = module.state_dict()
    saved = {k[len("prompts."):]: v for k, v in tensors.items() if k.startswith("prompts.")}
    if set(saved) != set(mine):
        raise ValueError(f"the adapter's prompt tensors {sorted(saved)} differ from this module's "
                         f"{sorted(mine)}")
    for k, v in saved.items():
        if v.shape != mine[k].shape:
            raise ValueError(f"adapter tensor prompts.{k} has shape {tuple(v.shape)}, the module's "
                             f"has {tuple(mine[k].shape)}")
    heads = prompt_files.head_tensors(model, state, tensors, "heads.",
                                      lambda key: key.startswith("prompts."))
    # all checks passed: write
    module.load_state_dict({k: v.to(mine[k].device) for k, v in saved.items()})
    with torch.no_grad():
        for param, value in heads:
            param.copy_(value.to(param))
