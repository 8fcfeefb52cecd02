"""Plain eager implementations of the prompt methods on real (unpatched) transformers models, for
the acceptance tests of ``patch_model(model, config)``.

* Prefix-tuning / P-Tuning v2: exactly PEFT's mechanics (``reference/ecosystem.md`` 2.3-2.7): the
  prefix goes in as a fresh ``DynamicCache`` (``EncoderDecoderCache`` for seq2seq, prefix in the
  decoder self-attention only) built from the prefix tensors, the attention mask (decoder mask for
  seq2seq) gets P ones prepended, and the model itself then places real tokens at P..P+n-1.
* Prompt tuning: ``inputs_embeds = [prompts; embed(input_ids)]``, mask extended with ones, causal-LM
  labels padded with -100 (PEFT's prompt-tuning forward).
* Global Prompt Cell: forward hooks on the encoder layers that rewrite the prompt rows after each
  layer with the gated state, written out with plain torch ops (``reference/methods.md`` 3.3), not
  through ``ptkernels.gpc_cell``.

Nothing here imports ptkernels' kernels or integration: it is the independent side of the checks.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from transformers import DynamicCache, EncoderDecoderCache


def _rows(prefix: torch.Tensor, batch: int, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """(Hkv, P, D) shared or (T, Hkv, P, D) bank -> (B, Hkv, P, D)."""
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(batch, -1, -1, -1)
    if task_ids is None:
        if prefix.shape[0] != 1:
            raise ValueError("a bank prefix needs task_ids")
        return prefix.expand(batch, -1, -1, -1)
    return prefix.index_select(0, task_ids)


def prefix_cache(prefix_kv: tuple[torch.Tensor, torch.Tensor], batch: int,
                 task_ids: Optional[torch.Tensor] = None) -> DynamicCache:
    """A DynamicCache holding the prefix of every layer. ``prefix_kv``: (K, V), each (L, Hkv, P, D)
    or a bank (L, T, Hkv, P, D)."""
    k, v = prefix_kv
    cache = DynamicCache()
    for layer in range(k.shape[0]):
        cache.update(_rows(k[layer], batch, task_ids), _rows(v[layer], batch, task_ids), layer)
    return cache


def cache_kwarg(model) -> str:
    """The name under which ``model``'s forward takes a cache: ``cache`` from transformers 5.24,
    ``past_key_values`` before (a task model that forwards ``**kwargs`` is asked of its backbone)."""
    for fn in (model.forward, model.base_model.forward):
        params = inspect.signature(fn).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return "past_key_values"


def prefix_forward(model, prefix_kv: tuple[torch.Tensor, torch.Tensor], *, task_ids=None, **inputs):
    """``model(**inputs)`` with PEFT-style prefix tuning of the (decoder) self-attention.

    ``prefix_kv``: the self-attention prefix (decoder-only / encoder-only models) or the decoder
    self-attention prefix (encoder-decoder models)."""
    inputs = dict(inputs)
    p = prefix_kv[0].shape[-2]
    if model.config.is_encoder_decoder:
        ref = inputs.get("decoder_input_ids")
        if ref is None:
            ref = inputs["labels"]
        b = ref.shape[0]
        cache = EncoderDecoderCache(prefix_cache(prefix_kv, b, task_ids), DynamicCache())
        mask = inputs.get("decoder_attention_mask")
        if mask is None:
            mask = torch.ones(b, ref.shape[1], dtype=torch.long)
        inputs["decoder_attention_mask"] = torch.cat([mask.new_ones(b, p), mask], 1)
    else:
        ref = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        b = ref.shape[0]
        cache = prefix_cache(prefix_kv, b, task_ids)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(b, ref.shape[1], dtype=torch.long)
        inputs["attention_mask"] = torch.cat([mask.new_ones(b, p), mask], 1)
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + p
    return model(**inputs, **{cache_kwarg(model): cache}, use_cache=True)


def gpc_step(update: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             variant: str) -> torch.Tensor:
    """One GPC update, written out: [a_1, a_2, ...] = [U, S] @ W + b."""
    d = update.shape[-1]
    state = state.expand_as(update)
    a = torch.cat([update, state], -1) @ weight + bias
    gates = [a[..., i * d:(i + 1) * d] for i in range(a.shape[-1] // d)]
    if variant == "lstm":
        return torch.sigmoid(gates[0]) * state + torch.sigmoid(gates[1]) * update
    if variant == "candidate":
        return torch.sigmoid(gates[0]) * state + torch.sigmoid(gates[1]) * torch.tanh(gates[2])
    if variant == "gru":
        g = torch.sigmoid(gates[0])
        return g * update + (1 - g) * state
    if variant == "reinject":
        return torch.sigmoid(gates[0]) * update + torch.sigmoid(gates[1]) * state
    raise ValueError(variant)


def encoder_layers(model) -> torch.nn.ModuleList:
    """The layer list of the (encoder) stack: the first ModuleList with one entry per layer."""
    n = getattr(model.config, "num_hidden_layers", None) or model.config.num_layers
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"no layer list of length {n} in {type(model).__name__}")


@contextlib.contextmanager
def gpc_hooks(model, m: int, prompts: torch.Tensor, weight, bias, variant: str):
    """After every layer: S <- gpc(U = rows[:m], S); rows[:m] <- S (S0 = prompts)."""
    state = {"s": prompts}

    def hook(layer, args, output):
        h = output[0] if isinstance(output, tuple) else output
        memory = prompts if variant == "reinject" else state["s"]
        new = gpc_step(h[:, :m], memory.to(h.dtype), weight.to(h.dtype), bias.to(h.dtype), variant)
        state["s"] = new
        h = torch.cat([new, h[:, m:]], 1)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handles = [layer.register_forward_hook(hook) for layer in encoder_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def prompt_forward(model, prompts: torch.Tensor, *, task_ids=None, gpc=None, causal_lm=None, **inputs):
    """``model(**inputs)`` with soft prompts (T, m, d) prepended to the input embeddings.

    ``gpc``: None or (weight, bias, variant), applied after every encoder layer."""
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    b = ids.shape[0]
    rows = prompts.expand(b, -1, -1) if task_ids is None else prompts.index_select(0, task_ids)
    rows = rows.to(embeds.dtype)
    m = rows.shape[1]
    inputs["inputs_embeds"] = torch.cat([rows, embeds], 1)
    if inputs.get("attention_mask") is not None:
        mask = inputs["attention_mask"]
        inputs["attention_mask"] = torch.cat([mask.new_ones(b, m), mask], 1)
    if inputs.get("token_type_ids") is not None:
        tt = inputs["token_type_ids"]
        inputs["token_type_ids"] = torch.cat([tt.new_zeros(b, m), tt], 1)
    if causal_lm is None:
        causal_lm = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    if causal_lm and inputs.get("labels") is not None:
        labels = inputs["labels"]
        inputs["labels"] = torch.cat([labels.new_full((b, m), -100), labels], 1)
    if gpc is None:
        return model(**inputs)
    weight, bias, variant = gpc
    with gpc_hooks(model, m, rows, weight, bias, variant):
        return model(**inputs)
