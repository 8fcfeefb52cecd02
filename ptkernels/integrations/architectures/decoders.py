"""Decoder-only families: Llama-style (rotary positions, GQA), GPT-2 / GPT-NeoX, OPT."""
from __future__ import annotations

import torch

from ptkernels.integrations.architectures.base import (Architecture, base_model_hook, gqa_heads,
                                                       learned_max_positions, mha_heads,
                                                       no_max_positions, shift_arange,
                                                       shift_positions)


def _opt_positions(call, ref, past, p):
    """OPT: positions are the cumulative sum of the mask (padding-aware) plus the prefix."""
    mask = call.got.get("attention_mask")
    if mask is None:
        mask = torch.ones(ref.shape[0], past + ref.shape[1], device=ref.device, dtype=torch.long)
    return ((torch.cumsum(mask, dim=1) + p) * mask - 1).long()[:, past:]


def _opt_shift(module, call, p):
    return shift_positions(call, p, _opt_positions)


def _opt_hooks(model):
    # OPTForCausalLM calls model.decoder directly, skipping OPTModel.forward
    return [(model.base_model.decoder, "self", _opt_shift)]


def _rope(model_type, attention):
    return Architecture(model_type, "decoder", (attention,), gqa_heads,
                        position_hooks=base_model_hook(shift_arange), max_positions=no_max_positions)


ENTRIES = (
    _rope("llama", "LlamaAttention"),
    _rope("mistral", "MistralAttention"),
    _rope("qwen2", "Qwen2Attention"),
    _rope("qwen3", "Qwen3Attention"),
    _rope("gemma2", "Gemma2Attention"),
    _rope("phi3", "Phi3Attention"),
    Architecture("gpt2", "decoder", ("GPT2Attention",), mha_heads,
                 position_hooks=base_model_hook(shift_arange), max_positions=learned_max_positions),
    Architecture("gpt_neox", "decoder", ("GPTNeoXAttention",), mha_heads,
                 position_hooks=base_model_hook(shift_arange), max_positions=no_max_positions),
    Architecture("opt", "decoder", ("OPTAttention",), mha_heads, position_hooks=_opt_hooks,
                 max_positions=learned_max_positions),
)
