"""``build_prompt_module(config, spec)``: validate a prompt config against a model, build its module.

Errors are raised before anything is built. Also ``trainable_head_names(model)``: the task-head
modules of HF classification models that stay trainable with P-Tuning v2 (the integration freezes
everything else).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ptkernels.prompts.configs import PrefixTuningConfig, PromptTuningConfig, PTuningV2Config
from ptkernels.prompts.prefix import PrefixPromptModule
from ptkernels.prompts.prompt_tuning import InputPromptModule
from ptkernels.prompts.spec import ModelSpec

# Top-level attribute names of task heads in transformers' *ForSequenceClassification,
# *ForTokenClassification, *ForQuestionAnswering and *ForMultipleChoice models (BERT/RoBERTa
# `classifier`, Llama-style `score`, QA `qa_outputs`, BART `classification_head`). Heads particular
# to one architecture (DeBERTa's ContextPooler) are named by its registry entry
# (``ptkernels.integrations.architectures``, ``Architecture.head_names``).
HEAD_NAMES = ("classifier", "score", "qa_outputs", "qa_classifier", "classification_head")
HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                 "ForMultipleChoice")


def trainable_head_names(model: nn.Module) -> list[str]:
    """Names of the generic top-level task-head modules of ``model`` (may be empty)."""
    cls = type(model).__name__
    if not cls.endswith(HEAD_SUFFIXES):
        return []
    return [n for n, _ in model.named_children() if n in HEAD_NAMES]


def _prefix_sites(config, spec: ModelSpec) -> list[str]:
    have = list(spec.sites)
    if config.sites is None:
        return have
    missing = [s for s in config.sites if s not in spec.sites]
    if missing:
        raise ValueError(f"sites {missing} do not exist in this {spec.model_type!r} model "
                         f"(it has {have}); choose from those")
    return [s for s in have if s in config.sites]


def _check_length(config, spec: ModelSpec, shifts_positions: bool) -> None:
    if spec.max_positions is None or not shifts_positions:
        return
    if config.num_virtual_tokens >= spec.max_positions:
        raise ValueError(f"num_virtual_tokens={config.num_virtual_tokens} leaves no position for real "
                         f"tokens: this {spec.model_type!r} model has {spec.max_positions} positions")


def build_prompt_module(config, spec: ModelSpec, *, backend: str = "auto") -> nn.Module:
    """The ``PromptModule`` for ``config`` on the model ``spec`` describes (see ``spec.py``)."""
    if not isinstance(config, (PrefixTuningConfig, PTuningV2Config, PromptTuningConfig)):
        raise TypeError("config must be a PrefixTuningConfig, PTuningV2Config or PromptTuningConfig, "
                        f"got {type(config).__name__}")
    # fields may have been changed since construction: validate again (on a copy)
    config = dataclasses.replace(config)
    ids = getattr(config, "init_token_ids", None)
    if ids and max(ids) >= spec.vocab_size:
        raise ValueError(f"init_token_ids must be < vocab_size ({spec.vocab_size}), got {max(ids)}")
    if isinstance(config, PromptTuningConfig):
        _check_length(config, spec, True)
        return InputPromptModule(config, spec, backend=backend)
    if not spec.sites:
        raise ValueError(f"this {spec.model_type!r} model has no attention layers that can take a prefix")
    sites = _prefix_sites(config, spec)
    _check_length(config, spec, config.position_offset)
    if config.init == "words" and spec.capture_kv is None:
        raise ValueError("init='words' needs the model's keys/values of real tokens, but this model's "
                         "spec has no capture_kv")
    module = PrefixPromptModule(config, spec, sites)
    if config.init == "words":
        ids = torch.tensor(config.init_token_ids, device=spec.device)
        with torch.no_grad():
            captured = spec.capture_kv(ids)
        for site, enc in module.encoders.items():
            if site not in captured:
                raise ValueError(f"capture_kv returned no keys/values for site {site!r}")
            k, v = captured[site]                                    # (L, Hkv, P, D) each
            kv = torch.stack([k, v], 1).unsqueeze(2).expand(-1, -1, config.num_tasks, -1, -1, -1)
            enc.set_kv(kv)
    return module
