"""What an architecture entry is, and the behaviour several families share.

An ``Architecture`` (one per ``config.model_type``) describes everything model-specific the
integration does, as data plus callables:

* ``attention``: the attention module class names (modules whose ``forward`` calls
  ``ALL_ATTENTION_FUNCTIONS.get_interface``), or, with ``bespoke_forward``, the class whose
  ``forward`` is replaced (an attention class ``set_attn_implementation`` cannot switch).
* ``heads(config) -> (num_kv_heads, head_dim)``; ``num_layers(config, site)``: layers of a site.
* ``site_of(module_name, module)``: the prefix site of an attention module ("self" for
  decoder-only / encoder-only models; "encoder", "decoder" or "cross" for encoder-decoders).
* ``position_hooks(model)``: [(module, site, shift)]: real tokens move to positions P..P+n-1
  while a prefix is active (the PEFT convention) through a forward pre-hook on ``module`` that
  calls ``shift(module, call, p)`` (``Call``: the bound arguments) for the new (args, kwargs).
* ``max_positions(config)``: the number of positions real tokens can take (None: unbounded,
  e.g. rotary or relative positions).
* ``bind_extra(model, site, layer, module)``: per-attention-module data the callables need
  (stored in the module's ``Binding``); ``prefix_bias(binding, module, nq, nk, p, dtype, device)``:
  the attention bias of the prefix columns when the layer has a bias (default zeros).
* ``head_names``: task-head modules beyond the generic ones that P-Tuning v2 keeps trainable.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ptkernels.integrations import compat
from ptkernels.integrations.state import current


# ----------------------------------------------------------------------------------------------
# heads, layers, sites
# ----------------------------------------------------------------------------------------------

def gqa_heads(cfg):
    """Llama-style configs: (num_key_value_heads or num_attention_heads, head_dim)."""
    h = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    return hkv, d


def mha_heads(cfg):
    return cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads


def hidden_layers(cfg, site):
    return cfg.num_hidden_layers


def self_site(name, module):
    return "self"


def seq2seq_site(name, module):
    parts = name.split(".")
    if "EncDecAttention" in parts or "encoder_attn" in parts:
        return "cross"
    if "decoder" in parts:
        return "decoder"
    return "encoder"


# ----------------------------------------------------------------------------------------------
# positions
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Call:
    """A forward call as the position shifts see it: ``names`` (positional parameter names of the
    hooked forward), ``args``/``kwargs`` as given, ``got`` {name: value} without defaults."""
    forward: Callable
    names: tuple
    args: tuple
    kwargs: dict
    got: dict

    def replace(self, key, value):
        return compat.replace(self.names, self.args, self.kwargs, key, value)

    def tokens(self):
        """(reference tensor (B, n, ...), number of cached tokens) or (None, 0)."""
        ids, embeds = self.got.get("input_ids"), self.got.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        return ref, compat.cache_length_of_call(self.got)


def shift_positions(call: Call, p: int, positions):
    """Shift the call's positions by the prefix length P: given ``position_ids`` + P, else
    ``positions(call, ref, past, p)`` ((B or 1, n) ids, computed from the tokens ``ref`` and the
    cache length ``past``). None when the call has neither ids nor tokens to count."""
    pos = call.got.get("position_ids")
    if pos is not None:
        return call.replace("position_ids", pos + p)
    ref, past = call.tokens()
    if ref is None:
        return None
    return call.replace("position_ids", positions(call, ref, past, p))


def shift_arange(module, call: Call, p: int):
    """Positions arange(n) + past + P (llama-style position_ids, BERT/GPT-2 absolute ones)."""
    return shift_positions(call, p, lambda call, ref, past, p: (
        torch.arange(ref.shape[1], device=ref.device) + past + p).unsqueeze(0))


def base_model_hook(shift):
    """``position_hooks`` for a shift applied on ``model.base_model`` (site "self")."""
    def hooks(model):
        return [(model.base_model, "self", shift)]
    return hooks


def no_max_positions(cfg):
    return None


def learned_max_positions(cfg):
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def zero_prefix_bias(binding, module, nq, nk, p, dtype, device):
    return torch.zeros(1, 1, 1, p, dtype=dtype, device=device)


def no_extra(model, site, layer, module):
    return None


@dataclasses.dataclass(frozen=True)
class Architecture:
    model_type: str
    family: str                                   # "decoder", "encoder" or "seq2seq"
    attention: tuple
    heads: Callable
    num_layers: Callable = hidden_layers
    site_of: Callable = self_site
    position_hooks: Optional[Callable] = None
    max_positions: Callable = learned_max_positions
    bind_extra: Callable = no_extra
    prefix_bias: Callable = zero_prefix_bias
    bespoke_forward: Optional[Callable] = None
    head_names: tuple = ()

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family == "seq2seq"

    @property
    def input_site(self) -> str:
        """The site whose layers see prompt-tuning input rows."""
        return "encoder" if self.is_encoder_decoder else "self"

    def attention_modules(self, model) -> dict:
        """{site: [attention modules in layer order]} for ``model``."""
        sites: dict = {}
        for name, module in model.named_modules():
            if type(module).__name__ in self.attention:
                sites.setdefault(self.site_of(name, module), []).append(module)
        return sites


class PositionHook:
    """Forward pre-hook (with kwargs) moving real tokens to positions P..P+n-1 while the call's
    prefix context has a prefix of length P for ``site``. A callable object, not a closure, so a
    deep copy of the model copies it."""

    def __init__(self, site: str, shift: Callable):
        self.site, self.shift = site, shift

    def __call__(self, module, args, kwargs):
        from_ctx = _current_offset(self.site)
        if not from_ctx:
            return None
        forward = module.forward
        names, got = compat.bind(forward, args, kwargs)
        return self.shift(module, Call(forward, names, args, kwargs, got), from_ctx)


def _current_offset(site):
    ctx = current()
    return ctx.offset(site) if ctx is not None else 0
