"""The PEFT path: ``patch_model(peft_model)`` (adapter files: ``adapters.py``).

Prompt tuning and P-tuning (v1) prepend virtual *input embeddings*: they only need the attention
patch of the base model. Prefix tuning (PEFT's ``PREFIX_TUNING``, which is also P-Tuning v2)
normally injects the prefix as ``past_key_values`` (one copy per batch row, concatenated in every
layer, a (n, P + n) mask). After ``patch_model`` the prefix goes around the cache instead:

* the ``PeftModel`` instance gets its own ``forward`` and ``generate`` (instance attributes, removed
  again by ``unpatch_model``). They run PEFT's prompt encoder ONCE per call on the prompt token ids
  (batch size 1: no batch expansion; MLP reparameterization in training, the stored embedding in
  inference mode, exactly as ``PeftModel.get_prompt``), decode the result with PEFT's layout
  (``view(P, 2L, H, D)``; rows 2i / 2i+1 are layer i's K / V; for seq2seq PEFT's ``cat([x, x])``
  + ``split(4)`` means decoder layer i uses rows 4i, 4i+1 (mod 2L)) into a ``PrefixContext`` and
  call the wrapped transformers model directly: no ``past_key_values``, no mask extension;
  real tokens still sit at positions P..P+n-1 (the integration's position hooks).
* PEFT keeps its parameters (``prompt_encoder``), optimizer view, ``Trainer`` use and
  ``save_pretrained`` format; gradients reach ``prompt_encoder`` through the decoded views.
"""
from __future__ import annotations

import inspect

import torch

from ptkernels.integrations import checkpointing
from ptkernels.integrations.patching import patch_base, undo
from ptkernels.integrations.state import PrefixContext, get_state, use_context

PEFT_ATTR = "_ptkernels_peft"


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:   # PEFT is optional
        return False
    return isinstance(model, PeftModel)


def _prompt_type(peft_model) -> str:
    cfg = peft_model.active_peft_config
    if not getattr(cfg, "is_prompt_learning", False):
        raise ValueError(f"patch_model(peft_model) supports prompt learning (prefix tuning, prompt "
                         f"tuning, p-tuning); got peft_type={cfg.peft_type}")
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if kind not in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        raise ValueError(f"patch_model(peft_model) supports PREFIX_TUNING, PROMPT_TUNING and "
                         f"P_TUNING, got {kind}")
    return kind


def decode_prefix(flat: torch.Tensor, *, num_layers: int, num_heads: int, token_dim: int,
                  num_submodules: int):
    """PEFT's prefix layout -> ({site: (K, V)}) with K, V (L, 1, H, P, D) views of ``flat``.

    ``flat``: (P, L * 2 * token_dim), PEFT's prompt-encoder output / ``prompt_embeddings``.
    """
    p = flat.shape[0]
    d = token_dim // num_heads
    x = flat.view(p, 2 * num_layers, num_heads, d).permute(1, 2, 0, 3)   # (2L, H, P, D)
    if num_submodules == 1:
        return {"self": (x[0::2].unsqueeze(1), x[1::2].unsqueeze(1))}
    # seq2seq: cat([x, x]) on the 2L axis then split(4): decoder layer i <- rows 4i, 4i+1 (mod 2L)
    rows = torch.arange(num_layers, device=flat.device) * 4
    return {"decoder": (x[rows % (2 * num_layers)].unsqueeze(1),
                        x[(rows + 1) % (2 * num_layers)].unsqueeze(1))}


def prefix_context(peft_model) -> PrefixContext:
    """The call's prefix context: PEFT's prompt encoder run once (batch size 1)."""
    cfg = peft_model.active_peft_config
    adapter = peft_model.active_adapter
    encoder = peft_model.prompt_encoder[adapter]
    p = cfg.num_virtual_tokens
    if cfg.inference_mode:
        flat = encoder.embedding.weight
    else:
        tokens = peft_model.prompt_tokens[adapter][:p].unsqueeze(0).to(encoder.embedding.weight.device)
        flat = encoder(tokens)[0]
    dtype = getattr(peft_model, "base_model_torch_dtype", None)
    if dtype is not None:
        flat = flat.to(dtype)
    prefixes = decode_prefix(flat, num_layers=cfg.num_layers, num_heads=cfg.num_attention_heads,
                             token_dim=cfg.token_dim,
                             num_submodules=cfg.num_transformer_submodules)
    return PrefixContext(prefixes)


_DROP = ("task_ids", "adapter_names")


def _check_fits(peft_model, state):
    """The PEFT prefix layout must match the model's attention layers (else a clear error)."""
    cfg = peft_model.active_peft_config
    site = "decoder" if cfg.num_transformer_submodules == 2 else "self"
    mods = state.sites.get(site)
    if mods is None:
        raise ValueError(f"PEFT prefix config targets {site} attention, the model has "
                         f"{sorted(state.sites)}")
    hkv, d = state.arch.heads(peft_model.get_base_model().config)
    if cfg.num_layers != len(mods) or cfg.num_attention_heads != hkv or \
            cfg.token_dim != hkv * d:
        raise ValueError(f"PEFT prefix config (num_layers={cfg.num_layers}, num_attention_heads="
                         f"{cfg.num_attention_heads}, token_dim={cfg.token_dim}) does not fit the "
                         f"model ({len(mods)} layers, {hkv} kv heads of dim {d})")


class PeftPrefixCall:
    """The PEFT model's instance ``forward`` / ``generate`` for prefix tuning: PEFT's prompt
    encoder once per call, the base model called with that prefix context and no cache prefix.
    A callable object holding the PEFT model (a deep copy of the model copies it)."""

    def __init__(self, peft_model, method: str):
        self.peft_model, self.method = peft_model, method

    @property
    def __signature__(self):
        return inspect.signature(getattr(type(self.peft_model), self.method).__get__(self.peft_model))

    def __call__(self, *args, **kwargs):
        for key in _DROP:
            kwargs.pop(key, None)
        base = self.peft_model.get_base_model()
        state = get_state(base)
        checkpointing.ensure(state)
        if self.method == "generate":
            with torch.no_grad(), use_context(prefix_context(self.peft_model)):
                return base.generate(*args, **kwargs)
        with use_context(prefix_context(self.peft_model)):
            return base(*args, **kwargs)


def patch_peft_model(peft_model, *, backend: str = "auto"):
    kind = _prompt_type(peft_model)
    if PEFT_ATTR in peft_model.__dict__:
        raise ValueError("this PEFT model is already patched by ptkernels")
    base = peft_model.get_base_model()
    state = patch_base(base, backend=backend, allow_peft_owner=True)
    try:
        if kind == "PREFIX_TUNING":
            _check_fits(peft_model, state)
            state.peft_kind = kind
            peft_model.__dict__["forward"] = PeftPrefixCall(peft_model, "forward")
            peft_model.__dict__["generate"] = PeftPrefixCall(peft_model, "generate")
    except BaseException:
        undo(base, state)
        raise
    peft_model.__dict__[PEFT_ATTR] = kind
    return peft_model


def unpatch_peft_model(peft_model):
    if PEFT_ATTR not in peft_model.__dict__:
        raise ValueError("this PEFT model is not patched by ptkernels")
    for key in ("forward", "generate", PEFT_ATTR):
        peft_model.__dict__.pop(key, None)
    base = peft_model.get_base_model()
    state = get_state(base)
    if state is not None:
        undo(base, state)
    return peft_model
