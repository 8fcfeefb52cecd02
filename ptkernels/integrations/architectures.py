"""Per-architecture facts the integration needs, keyed by ``config.model_type`` (Liger-Kernel style).

For each supported model type:

* ``attention``: the attention module class names (the modules whose ``forward`` calls
  ``ALL_ATTENTION_FUNCTIONS.get_interface``), or the bespoke class whose forward is replaced
  (``bespoke=True``: deberta-v2, which ``set_attn_implementation`` cannot switch).
* ``site_of(name, module)``: which prefix site an attention module belongs to: "self" for
  decoder-only and encoder-only models; "encoder", "decoder" or "cross" for encoder-decoders.
* ``positions``: how real tokens are moved to positions P..P+n-1 when a prefix is present (the
  PEFT convention): "position_ids" (llama-style: the backbone takes ``position_ids``; default
  ``arange(n) + past``), "opt" (mask-cumsum positions), "bert" (absolute embeddings from
  ``arange``), "roberta" (padding-aware cumsum positions), "bart" (the decoder's learned positions),
  "t5" (relative bias: prefix columns get the bias of distance j - (P + i); no position ids),
  None (no absolute positions of real tokens to move).
* ``heads(config)`` -> (num_kv_heads, head_dim) for each site's attention.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional


def _llama_heads(cfg):
    h = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    return hkv, d


def _mha_heads(cfg):
    return cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads


def _t5_heads(cfg):
    return cfg.num_heads, cfg.d_kv


def _bart_heads(cfg):
    return cfg.encoder_attention_heads, cfg.d_model // cfg.encoder_attention_heads


def _self_site(name, module):
    return "self"


def _seq2seq_site(name, module):
    parts = name.split(".")
    if "EncDecAttention" in parts or "encoder_attn" in parts:
        return "cross"
    if "decoder" in parts:
        return "decoder"
    return "encoder"


@dataclasses.dataclass(frozen=True)
class Architecture:
    model_type: str
    attention: tuple[str, ...]
    heads: Callable
    site_of: Callable = _self_site
    positions: Optional[str] = "position_ids"
    is_encoder_decoder: bool = False
    bespoke: bool = False
    num_layers_attr: str = "num_hidden_layers"


def _decoder(model_type, cls, heads=_llama_heads, positions="position_ids", layers="num_hidden_layers"):
    return Architecture(model_type, (cls,), heads, positions=positions, num_layers_attr=layers)


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    _decoder("llama", "LlamaAttention"),
    _decoder("mistral", "MistralAttention"),
    _decoder("qwen2", "Qwen2Attention"),
    _decoder("qwen3", "Qwen3Attention"),
    _decoder("gemma2", "Gemma2Attention"),
    _decoder("phi3", "Phi3Attention"),
    _decoder("gpt2", "GPT2Attention", _mha_heads),
    _decoder("gpt_neox", "GPTNeoXAttention", _mha_heads),
    _decoder("opt", "OPTAttention", _mha_heads, positions="opt"),
    Architecture("bert", ("BertSelfAttention",), _mha_heads, positions="bert"),
    Architecture("roberta", ("RobertaSelfAttention",), _mha_heads, positions="roberta"),
    Architecture("xlm-roberta", ("XLMRobertaSelfAttention",), _mha_heads, positions="roberta"),
    Architecture("deberta-v2", ("DisentangledSelfAttention",), _mha_heads, positions=None,
                 bespoke=True),
    Architecture("t5", ("T5Attention",), _t5_heads, _seq2seq_site, positions="t5",
                 is_encoder_decoder=True, num_layers_attr="num_layers"),
    Architecture("bart", ("BartAttention",), _bart_heads, _seq2seq_site, positions="bart",
                 is_encoder_decoder=True, num_layers_attr="decoder_layers"),
)}

SUPPORTED = tuple(sorted(ARCHITECTURES))


def lookup(model) -> Architecture:
    """The table entry for ``model`` or a ValueError naming the supported model types."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"ptkernels.patch_model does not support model_type={model_type!r} "
                         f"({type(model).__name__}); supported model types: {', '.join(SUPPORTED)}")
    return ARCHITECTURES[model_type]


def attention_modules(model, arch: Architecture) -> dict[str, list]:
    """{site: [attention modules in layer order]} for ``model``."""
    sites: dict[str, list] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in arch.attention:
            sites.setdefault(arch.site_of(name, module), []).append(module)
    return sites
