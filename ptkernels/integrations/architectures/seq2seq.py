"""Encoder-decoder families: T5 (relative position bias), BART (learned positions)."""
from __future__ import annotations

import torch

from ptkernels.integrations import compat
from ptkernels.integrations.architectures.base import Architecture, no_max_positions, seq2seq_site


def _t5_heads(cfg):
    return cfg.num_heads, cfg.d_kv


def _t5_layers(cfg, site):
    if site == "encoder":
        return cfg.num_layers
    return getattr(cfg, "num_decoder_layers", None) or cfg.num_layers


def _t5_bias_module(model, site, layer, module):
    """The site's module that owns the relative-attention bias (block 0's self-attention)."""
    stack = model.get_encoder() if site == "encoder" else model.get_decoder()
    return stack.block[0].layer[0].SelfAttention


def _t5_prefix_bias(binding, module, nq, nk, p, dtype, device):
    """T5 relative bias for the prefix columns: key j in 0..P-1, query at P + past + i (the
    distance a prefix concatenated in front of the keys would have)."""
    source = binding.extra
    if binding.site == "cross" or source is None or \
            not getattr(source, "has_relative_attention_bias", False):
        return torch.zeros(1, module.n_heads, nq, p, dtype=dtype, device=device)
    past = nk - nq
    full = compat.t5_relative_bias(source, nq, p + nk, p + past, device)
    return full[..., :p].to(dtype)


def _bart_heads(cfg):
    return cfg.encoder_attention_heads, cfg.d_model // cfg.encoder_attention_heads


def _bart_layers(cfg, site):
    return cfg.encoder_layers if site == "encoder" else cfg.decoder_layers


def _bart_shift(module, call, p):
    """BART's learned positional embedding: shift its position_ids, else its cached-length
    argument (under whatever name this transformers release gives it)."""
    if call.got.get("position_ids") is not None:
        return call.replace("position_ids", call.got["position_ids"] + p)
    arg = compat.first_accepted(call.forward, compat.CACHE_LENGTH_ARGS)
    if arg is None:
        raise TypeError(f"{type(module).__name__}.forward takes none of "
                        f"{compat.CACHE_LENGTH_ARGS}: cannot shift positions by the prefix")
    past = call.got.get(arg, 0) or 0
    return call.replace(arg, past + p)


def _bart_hooks(model):
    # each stack's learned positions shift by its own prefix
    return [(model.get_encoder().embed_positions, "encoder", _bart_shift),
            (model.get_decoder().embed_positions, "decoder", _bart_shift)]


ENTRIES = (
    Architecture("t5", "seq2seq", ("T5Attention",), _t5_heads, num_layers=_t5_layers,
                 site_of=seq2seq_site, max_positions=no_max_positions,
                 bind_extra=_t5_bias_module, prefix_bias=_t5_prefix_bias),
    Architecture("bart", "seq2seq", ("BartAttention",), _bart_heads, num_layers=_bart_layers,
                 site_of=seq2seq_site, position_hooks=_bart_hooks),
)
