"""Encoder-only families: BERT (absolute positions), RoBERTa / XLM-R (padding-aware positions),
DeBERTa-v2 (disentangled relative attention, a bespoke attention forward)."""
from __future__ import annotations

import torch

from ptkernels.integrations.architectures.base import (Architecture, base_model_hook, mha_heads,
                                                       shift_arange)
from ptkernels.integrations.transformers import ptkernels_attention


def _roberta_shift(module, call, p):
    """RoBERTa numbers real tokens from padding_idx + 1, skipping pads: start after the prefix."""
    pos = call.got.get("position_ids")
    if pos is not None:
        return call.replace("position_ids", pos + p)
    ids = call.got.get("input_ids")
    if ids is None:   # roberta numbers inputs_embeds sequentially, prefix or not
        return None
    _, past = call.tokens()
    emb = module.embeddings
    return call.replace("position_ids",
                        emb.create_position_ids_from_input_ids(ids, emb.padding_idx, past + p))


def _roberta_max_positions(cfg):
    return cfg.max_position_embeddings - (cfg.pad_token_id + 1)


def deberta_forward(self, hidden_states, attention_mask, output_attentions=False,
                    query_states=None, relative_pos=None, rel_embeddings=None):
    """``DisentangledSelfAttention.forward`` through ``ptkernels_attention``.

    The disentangled relative terms (c2p + p2c, already scaled) become ``attn_bias``; prefix
    columns get no relative term (prefix keys have no position), as in P-Tuning v2's DeBERTa.
    The (B, 1, n, n) mask DeBERTa builds is the outer product of the padding mask: its diagonal
    is the key-padding mask. The bias depends on the hidden states, so it carries a gradient
    whenever anything before the layer trains (the op gives attn_bias its gradient).
    """
    if output_attentions:
        raise ValueError("output_attentions=True needs eager attention; unpatch the model first")
    q_in = hidden_states if query_states is None else query_states
    b, n = q_in.shape[:2]
    nk = hidden_states.shape[1]
    heads = self.num_attention_heads
    ql = self.transpose_for_scores(self.query_proj(q_in), heads)            # (B*H, n, d)
    kl = self.transpose_for_scores(self.key_proj(hidden_states), heads)
    vl = self.transpose_for_scores(self.value_proj(hidden_states), heads)
    scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    d = ql.shape[-1]
    bias = None
    if self.relative_attention:
        rel = self.disentangled_attention_bias(ql, kl, relative_pos,
                                               self.pos_dropout(rel_embeddings), scale_factor)
        bias = rel.view(b, heads, n, nk)
    kpm = None
    if attention_mask is not None:
        m = attention_mask
        kpm = (torch.diagonal(m[:, 0], dim1=-2, dim2=-1) if m.dim() == 4 else m).bool()
    out, _ = ptkernels_attention(self, ql.view(b, heads, n, d), kl.view(b, heads, nk, d),
                                 vl.view(b, heads, nk, d), kpm,
                                 scaling=1.0 / float((d * scale_factor) ** 0.5),
                                 dropout=self.dropout.p if self.training else 0.0,
                                 position_bias=bias)
    return out.reshape(b, n, heads * d), None


def _roberta(model_type, attention):
    return Architecture(model_type, "encoder", (attention,), mha_heads,
                        position_hooks=base_model_hook(_roberta_shift),
                        max_positions=_roberta_max_positions)


ENTRIES = (
    Architecture("bert", "encoder", ("BertSelfAttention",), mha_heads,
                 position_hooks=base_model_hook(shift_arange)),
    _roberta("roberta", "RobertaSelfAttention"),
    _roberta("xlm-roberta", "XLMRobertaSelfAttention"),
    # DebertaV2ForSequenceClassification's ContextPooler trains with the head (P2-code)
    Architecture("deberta-v2", "encoder", ("DisentangledSelfAttention",), mha_heads,
                 bespoke_forward=deberta_forward, head_names=("pooler",)),
)
