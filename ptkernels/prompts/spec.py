"""What the prompt methods need to know about a model, and what they give back.

This is the contract between ``ptkernels.integrations`` (which knows transformers models) and
``ptkernels.prompts`` (which knows the methods):

* The integration describes a supported model with a ``ModelSpec`` and calls
  ``ptkernels.prompts.build_prompt_module(config, spec)``.
* The returned ``PromptModule`` (an ``nn.Module`` holding every trainable prompt parameter)
  exposes, per forward pass:
    - prefix methods (``kind == "prefix"``): ``prefix_kv()`` -> ``{site: (K, V)}`` with K, V of
      shape (L_site, T, Hkv, P, D) in the model's dtype (MLP reparameterization and prefix dropout
      applied, computed once per forward, never per layer, never per batch row); the integration
      hands layer l's (T, Hkv, P, D) slice to ``prefix_attention`` with ``prefix_index`` =
      task ids (or none when T == 1);
    - input prompts (``kind == "input"``): ``input_prompts()`` -> (T, m, hidden) embeddings that
      the integration prepends to the input embeddings (mask extended), and ``gpc`` (a module or
      None): ``gpc.initial_state(prompt_rows (B, m, d)) -> S0`` and
      ``gpc(update (B, m, d), state) -> new state``, applied after every layer of the site.
* ``spec.capture_kv(token_ids) -> {site: (K, V)}`` with (L_site, Hkv, n, D): the frozen model's
  own keys/values for real tokens (for "init from real words"), provided by the integration.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

SITES = ("self", "encoder", "decoder", "cross")


@dataclasses.dataclass
class SiteSpec:
    """One family of attention layers that can carry a prefix.

    ``name``: "self" (the only self-attention of a decoder-only or encoder-only model),
    "encoder" / "decoder" (self-attention of an encoder-decoder model) or "cross".
    """
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass
class ModelSpec:
    model_type: str
    hidden_size: int
    vocab_size: int
    is_encoder_decoder: bool
    sites: dict[str, SiteSpec]
    max_positions: Optional[int]          # the model's position limit (None: unbounded, e.g. RoPE)
    dtype: torch.dtype
    device: torch.device
    embed_tokens: Callable[[torch.Tensor], torch.Tensor]   # token ids (..., n) -> (..., n, hidden)
    capture_kv: Optional[Callable[[torch.Tensor], dict]] = None
    task: Optional[str] = None            # "causal_lm", "seq_cls", "token_cls", "seq2seq", ...
