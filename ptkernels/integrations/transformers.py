"""The attention and mask functions ptkernels registers with transformers (name ``"ptkernels"``).

* ``ptkernels_attention`` (``AttentionInterface``): q (B, Hq, n, D), k/v (B, Hkv, Nk, D) ->
  ((B, n, Hq, D), None) through the public op ``ptkernels.prefix_attention``. The module's
  ``Binding`` (set by ``patch_model``) says which site and layer it is; the call's
  ``PrefixContext`` (``state.current()``) holds the prefixes, so concurrent calls never share one.
* ``ptkernels_mask`` (``AttentionMaskInterface``): the (B, Nk) key-padding mask (the last Nk
  columns of the user's mask, like transformers' flash-attention mask function) or None when
  nothing is padded: no (n, Nk) or (n, P + n) mask is ever built. Causality, sliding windows and
  soft-capping come from the attention module (``module.is_causal``, the ``sliding_window`` and
  ``softcap`` keyword arguments) and are applied inside the kernel. A user-supplied 4-D mask
  (transformers passes those through untouched) becomes an additive bias, prefix columns 0.
* Architecture-specific parts (T5's relative bias of the prefix columns) come from the
  registry entry the module's patch state holds, never from a string branch here.
"""
from __future__ import annotations

import torch

from ptkernels.integrations.state import binding_of, current
from ptkernels.integrations.state import get_state  # noqa: F401  (re-exported for callers)
from ptkernels.ops.prefix_attention import prefix_attention

ATTN_NAME = "ptkernels"


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _prefix_of(binding, ctx, query):
    """(prefix_k, prefix_v, prefix_index) of this layer for the call, in q's dtype (or Nones)."""
    if ctx is None or binding is None:
        return None, None, None
    entry = ctx.layer(binding.site, binding.layer)
    if entry is None or entry[0].shape[-2] == 0:
        return None, None, None
    pk, pv = (t.to(query.dtype) for t in entry)
    if pk.shape[0] == 1:
        return pk[0], pv[0], None
    if ctx.prefix_index is None:
        raise ValueError(f"a bank of {pk.shape[0]} prefixes needs task_ids (B,)")
    return pk, pv, ctx.prefix_index


def ptkernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kwargs):
    """transformers attention function: q (B, Hq, n, D), k/v (B, Hkv, Nk, D) -> ((B, n, Hq, D), None)."""
    binding = binding_of(module)
    ctx = current()
    if binding is not None and ctx is None and binding.state.owns_prefix and \
            torch._C._current_graph_task_id() != -1:
        raise RuntimeError(
            "ptkernels: a layer of a model with prompts is being recomputed inside backward "
            "without its forward's prefix context (activation checkpointing applied outside "
            "transformers' gradient_checkpointing_enable?). Use model.gradient_checkpointing_enable().")
    if ctx is not None and ctx.capture is not None and binding is not None:
        ctx.capture[(binding.site, binding.layer)] = (key[0].detach(), value[0].detach())
    pk, pv, pidx = _prefix_of(binding, ctx, query)
    p = 0 if pk is None else pk.shape[-2]
    nq, nk = query.shape[2], key.shape[2]
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = bool(getattr(module, "is_causal", False))
    kpm = bias = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            kpm = attention_mask[:, -nk:]
            if kpm.shape[-1] != nk:
                raise ValueError(f"the 2-D attention mask covers {attention_mask.shape[-1]} keys, "
                                 f"the attention sees {nk}")
            kpm = kpm.bool()
        else:   # an explicit 4-D mask (user-supplied): it already encodes causality
            bias = _additive(attention_mask, query.dtype)[..., -nk:]
            causal = False
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = position_bias.to(query.dtype) if bias is None else bias + position_bias.to(query.dtype)
    if bias is not None:
        b, hq = query.shape[0], query.shape[1]
        bias = bias.expand(b, hq, nq, nk)
        if p:
            pb = binding.state.arch.prefix_bias(binding, module, nq, nk, p, query.dtype,
                                                query.device)
            if not ctx.position_offset:
                pb = torch.zeros_like(pb)
            bias = torch.cat([pb.expand(b, hq, nq, p), bias], dim=-1)
    window = kwargs.get("sliding_window")
    window = int(window) if window is not None and window > 0 else None
    softcap = kwargs.get("softcap")
    softcap = float(softcap) if softcap else None
    dropout_p = float(dropout) if module.training else 0.0
    out = prefix_attention(query, key, value, pk, pv, prefix_index=pidx, causal=causal,
                           attention_mask=kpm, window=window, softcap=softcap, attn_bias=bias,
                           scale=scaling, dropout_p=dropout_p,
                           backend=binding.state.backend if binding is not None else "auto")
    return out.transpose(1, 2).contiguous(), None


def ptkernels_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """transformers mask function: the (B, kv_length) key-padding mask, or None without padding."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    # Dropping an all-True mask saves the kernel a load, but the test reads the data: under
    # torch.compile it would break the graph, so the (equivalent) mask is kept there.
    if torch.compiler.is_compiling():
        return attention_mask
    if attention_mask.shape[-1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register():
    """Register the attention and mask functions under ``ATTN_NAME`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_NAME, ptkernels_attention)
    AttentionMaskInterface.register(ATTN_NAME, ptkernels_mask)
