"""Export a trained prefix for serving without ptkernels: per-layer key/value tensors and a
transformers ``DynamicCache`` (``EncoderDecoderCache`` for encoder-decoders) holding them.

A stock transformers model (unpatched, any attention implementation) reproduces the patched
model's outputs when it is called with ``prefix_cache(...)`` as its cache argument and the
attention mask extended by P ones in front (``extend_mask``): the prefix then sits in the cache
as P earlier positions, the PEFT / original-paper layout, and real tokens at positions P..P+n-1
(``position_offset=True``, the default). The stock model copies the prefix into the cache once
per batch row; that is what serving without ptkernels costs.

Only the self-attention of decoder-only models and the decoder self-attention of encoder-decoder
models can live in a cache; an encoder or cross-attention prefix, input prompts and the Global
Prompt Cell have no cache form (serve them with ptkernels, or export input prompts as PEFT
prompt-tuning adapters with ``save_prompts``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ptkernels.integrations.state import get_state


def prefix_tensors(model) -> dict:
    """{site: (K, V)} of a model patched with a prefix config, each (L, T, Hkv, P, D), detached,
    no dropout (eval-mode values), in the model's dtype."""
    state = get_state(model)
    module = state.prompts if state is not None else None
    if module is None or module.kind != "prefix":
        raise ValueError(f"{type(model).__name__} has no ptkernels prefix: patch it with "
                         "ptkernels.patch_model(model, PrefixTuningConfig(...) / PTuningV2Config(...))")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return {site: (k.detach().clone(), v.detach().clone())
                    for site, (k, v) in module.prefix_kv().items()}
    finally:
        module.train(was_training)


def _rows(prefix: torch.Tensor, batch: int, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """(T, Hkv, P, D) -> (B, Hkv, P, D) for the batch (task_ids (B,) choose bank rows)."""
    if prefix.shape[0] == 1:
        if task_ids is not None and bool((task_ids != 0).any()):
            raise ValueError("task_ids other than 0 given for a single-task prefix")
        return prefix.expand(batch, -1, -1, -1).contiguous()
    if task_ids is None:
        raise ValueError(f"a bank of {prefix.shape[0]} prefixes needs task_ids (B,)")
    if task_ids.shape != (batch,):
        raise ValueError(f"task_ids must have shape (B,) = ({batch},), got {tuple(task_ids.shape)}")
    return prefix.index_select(0, task_ids.to(prefix.device).long())


def prefix_cache(model, batch_size: int, task_ids: Optional[torch.Tensor] = None):
    """A fresh transformers cache holding the model's prefix for ``batch_size`` rows.

    Decoder-only: a ``DynamicCache`` with layer l's (B, Hkv, P, D) keys and values.
    Encoder-decoder: an ``EncoderDecoderCache`` (decoder self-attention prefix, empty cross
    part). ``task_ids`` (B,) chooses each row's prefix from a bank. A cache is consumed by the
    call it is given to (it grows): make one per call.
    """
    from transformers import DynamicCache, EncoderDecoderCache
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tensors = prefix_tensors(model)
    state = get_state(model)
    site = "decoder" if state.arch.is_encoder_decoder else "self"
    other = sorted(set(tensors) - {site})
    if other:
        raise ValueError(f"a transformers cache can hold only the {site!r} prefix; this model also "
                         f"has prefixes for {other}, which stock transformers cannot apply "
                         "(serve it with ptkernels)")
    if site not in tensors:
        raise ValueError(f"this model has no {site!r} prefix to export")
    k, v = tensors[site]
    cache = DynamicCache()
    for layer in range(k.shape[0]):
        cache.update(_rows(k[layer], batch_size, task_ids), _rows(v[layer], batch_size, task_ids),
                     layer)
    if state.arch.is_encoder_decoder:
        cache = EncoderDecoderCache(cache, DynamicCache())
    return cache


def extend_mask(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, n) attention mask -> (B, P + n): the prefix positions in front, all visible."""
    tensors = prefix_tensors(model)
    p = next(iter(tensors.values()))[0].shape[-2]
    return torch.cat([attention_mask.new_ones(attention_mask.shape[0], p), attention_mask], 1)
