"""Prompt tuning: m soft prompt rows prepended to the input embeddings, with an optional GPC.

``input_prompts() -> (T, m, hidden)`` in the model's dtype; the integration prepends row
``task_ids[b]`` of it to each sequence (T == 1: the same prompt for every row) and, with a GPC,
calls ``gpc.initial_state`` / ``gpc(U, S)`` around every layer.
"""
from __future__ import annotations

import torch
from torch import nn

from ptkernels.prompts.gpc import GlobalPromptCell
from ptkernels.prompts.prefix import param_dtype
from ptkernels.prompts.spec import ModelSpec

_RMS_SAMPLE = 256   # vocabulary rows used to scale the random init


def initial_prompts(config, spec: ModelSpec, dtype) -> torch.Tensor:
    """(T, m, hidden) initial prompt rows for ``config.init``."""
    t, m, h = config.num_tasks, config.num_virtual_tokens, spec.hidden_size
    if config.init == "words":
        ids = torch.tensor(config.init_token_ids, device=spec.device)
        if int(ids.max()) >= spec.vocab_size:
            raise ValueError(f"init_token_ids must be < vocab_size ({spec.vocab_size}), got {int(ids.max())}")
        ids = ids.repeat((m + len(ids) - 1) // len(ids))[:m]          # PEFT TEXT init: cycle, cut
        ids = ids.expand(t, m)
    elif config.init == "vocab":
        ids = torch.randint(0, spec.vocab_size, (t, m), device=spec.device)
    else:
        ids = None
    with torch.no_grad():
        if ids is not None:
            return spec.embed_tokens(ids).to(dtype).clone()
        sample = spec.embed_tokens(torch.randint(0, spec.vocab_size, (min(_RMS_SAMPLE, spec.vocab_size),),
                                                 device=spec.device)).to(dtype)
        rms = sample.pow(2).mean().sqrt().clamp_min(1e-6)
        return torch.randn(t, m, h, dtype=dtype, device=spec.device) * rms


class InputPromptModule(nn.Module):
    """``kind == "input"``: prompt tuning, optionally with a Global Prompt Cell (``gpc``)."""
    kind = "input"
    position_offset = False   # prompts are real input rows: they take positions 0..m-1

    def __init__(self, config, spec: ModelSpec, backend: str = "auto"):
        super().__init__()
        self.config, self.method = config, config.method
        self.num_virtual_tokens, self.num_tasks = config.num_virtual_tokens, config.num_tasks
        self.model_dtype = spec.dtype
        pdtype = param_dtype(spec.dtype)
        self.prompts = nn.Parameter(initial_prompts(config, spec, pdtype))
        self.gpc = None
        if config.gpc is not None:
            self.gpc = GlobalPromptCell(spec.hidden_size, config.gpc.variant, config.gpc.forget_bias,
                                        dtype=pdtype, device=spec.device, backend=backend)

    def input_prompts(self) -> torch.Tensor:
        return self.prompts.to(self.model_dtype)

    def merge(self) -> "InputPromptModule":
        return self   # nothing to collapse

    def stored_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
