"""``patch_model`` / ``unpatch_model`` for transformers models: attention routed through
``ptkernels.prefix_attention`` with the prefix kept outside the KV cache.

How it works
------------
* One attention function and one mask function are registered with transformers under the name
  ``"ptkernels"`` (``AttentionInterface`` and ``AttentionMaskInterface``) and the model is switched
  with ``model.set_attn_implementation("ptkernels")``. Architectures whose attention class does not
  dispatch through the interface (deberta-v2) get their attention modules' ``forward`` replaced.
* Mask choice: the registered mask function returns the 2-D key-padding mask (B, Nk) (the last
  Nk columns of the user's mask, like transformers' flash-attention mask function) or None when
  nothing is padded; no (n, Nk) or (n, P + n) mask is ever built. Causality, sliding windows and
  soft-capping come from the attention module (``module.is_causal``, the ``sliding_window`` and
  ``softcap`` keyword arguments) and are applied inside the kernel. A user-supplied 4-D mask
  (transformers passes those through untouched) is honoured as an additive bias instead.
* The prefix lives in a per-forward ``PrefixContext`` pushed on the patch state by whoever owns
  the prompts (``ptkernels.integrations.peft`` for PEFT models, the prompt-module wrapper for
  ``patch_model(model, config)``). Each attention layer looks itself up (site, layer index) and
  takes its (T, Hkv, P, D) slice; the KV cache holds only real tokens, so generation works
  unchanged and the prefix applies at every decode step.
* Positions: while a context with a prefix is active, real tokens sit at positions P..P+n-1 (as
  in PEFT) through a forward pre-hook per architecture (``architectures.Architecture.positions``);
  T5 prefix columns get the relative-position bias of distance j - (P + past + i).
* Activation checkpointing: recomputation inside backward runs after the forward's context was
  popped, so ``PatchState.context`` falls back to the latest forward's context while autograd is
  executing a backward graph (the prefix tensors are the same objects, so gradients are exact).
* ``patch_model(model, config)`` (``prompt_attach.py``): builds the ``ModelSpec`` (with ``capture_kv``: the frozen model's
  real-token K/V captured in the attention function), calls
  ``ptkernels.prompts.build_prompt_module``, attaches the module as ``model.ptk_prompts``, freezes
  everything else (P-Tuning v2 keeps classification heads trainable) and gives the model an
  instance ``forward`` that computes ``prefix_kv()`` once per call (or prepends
  ``input_prompts()``, mask/labels extended, with GPC forward hooks on every layer) and accepts
  ``task_ids`` (B,). ``unpatch_model`` removes all of it and restores ``requires_grad`` flags.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import weakref
from typing import Any, Optional

import torch

from ptkernels.integrations import architectures as _arch
from ptkernels.integrations import compat as _compat
from ptkernels.ops.prefix_attention import prefix_attention

ATTN_NAME = "ptkernels"

# module -> (state, site, layer index within the site). Weak keys: a dropped model frees itself.
_MODULE_INFO: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------
# Per-forward prefix context
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PrefixContext:
    """The prefixes of one forward pass.

    ``prefixes``: {site: (K, V)} with K, V indexable by layer, each layer's entry (T, Hkv, P, D)
    (e.g. stacked tensors (L, T, Hkv, P, D)). ``prefix_index``: (B,) int64 task ids when T > 1.
    ``position_offset``: real tokens at positions P..P+n-1 (PEFT convention) when True.
    """
    prefixes: dict
    prefix_index: Optional[torch.Tensor] = None
    position_offset: bool = True

    def layer(self, site: str, layer: int):
        entry = self.prefixes.get(site)
        if entry is None:
            return None
        k, v = entry
        return k[layer], v[layer]

    def length(self, site: str) -> int:
        entry = self.prefixes.get(site)
        return 0 if entry is None else int(entry[0].shape[-2])

    def offset(self, site: str) -> int:
        return self.length(site) if self.position_offset else 0


@dataclasses.dataclass
class PatchState:
    arch: _arch.Architecture
    backend: str
    original_impl: Any
    sites: dict                      # {site: [attention modules]}
    hooks: list = dataclasses.field(default_factory=list)
    restore: list = dataclasses.field(default_factory=list)   # callables run by unpatch (LIFO)
    stack: list = dataclasses.field(default_factory=list)
    t5_bias: dict = dataclasses.field(default_factory=dict)   # site -> module with compute_bias
    extra: dict = dataclasses.field(default_factory=dict)     # owned by peft.py / prompt wrappers

    last: Optional[PrefixContext] = None    # the latest forward's context (for recomputation)

    def context(self) -> Optional[PrefixContext]:
        if self.stack:
            return self.stack[-1]
        # Activation checkpointing recomputes layers inside backward, after the forward's
        # context was popped: the recomputation must see the prefix that forward used.
        if self.last is not None and torch._C._current_graph_task_id() != -1:
            return self.last
        return None


def get_state(model) -> Optional[PatchState]:
    return getattr(model, "_ptkernels_state", None)


@contextlib.contextmanager
def prefix_context(model, ctx: PrefixContext):
    """Make ``ctx`` the active prefix context of patched ``model`` for the duration of the block."""
    state = get_state(model)
    if state is None:
        raise ValueError("prefix_context needs a model patched with ptkernels.patch_model")
    state.stack.append(ctx)
    state.last = ctx
    try:
        yield ctx
    finally:
        state.stack.pop()


# ----------------------------------------------------------------------------------------------
# The attention and mask functions registered with transformers
# ----------------------------------------------------------------------------------------------

def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _t5_prefix_bias(state, site, module, nq, nk, p, dtype, device):
    """T5 relative bias for the prefix columns: key j in 0..P-1, query at P + past + i."""
    bias_module = state.t5_bias.get(site)
    if bias_module is None or not getattr(bias_module, "has_relative_attention_bias", False):
        return torch.zeros(1, module.n_heads, nq, p, dtype=dtype, device=device)
    past = nk - nq
    full = _compat.t5_relative_bias(bias_module, nq, p + nk, p + past, device)
    return full[..., :p].to(dtype)


def ptkernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kwargs):
    """transformers attention function: q (B, Hq, n, D), k/v (B, Hkv, Nk, D) -> ((B, n, Hq, D), None)."""
    info = _MODULE_INFO.get(module)
    state, site, layer = info if info is not None else (None, None, None)
    if state is not None and "capture" in state.extra:   # capture_kv: the model's own K/V
        state.extra["capture"][(site, layer)] = (key[0].detach(), value[0].detach())
    ctx = state.context() if state is not None else None
    pk = pv = pidx = None
    p = 0
    if ctx is not None:
        entry = ctx.layer(site, layer)
        if entry is not None and entry[0].shape[-2] > 0:
            pk, pv = (t.to(query.dtype) for t in entry)
            p = pk.shape[-2]
            if pk.shape[0] == 1:
                pk, pv = pk[0], pv[0]
            else:
                pidx = ctx.prefix_index
                if pidx is None:
                    raise ValueError(f"a bank of {pk.shape[0]} prefixes needs task_ids (B,)")
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
            if state is not None and state.arch.positions == "t5":
                pb = _t5_prefix_bias(state, site, module, nq, nk, p, query.dtype, query.device)
                if not ctx.position_offset:
                    pb = torch.zeros_like(pb)
            else:
                pb = torch.zeros(1, 1, 1, p, dtype=query.dtype, device=query.device)
            bias = torch.cat([pb.expand(b, hq, nq, p), bias], dim=-1)
    window = kwargs.get("sliding_window")
    window = int(window) if window is not None and window > 0 else None
    softcap = kwargs.get("softcap")
    softcap = float(softcap) if softcap else None
    dropout_p = float(dropout) if module.training else 0.0
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        # A trainable bias (T5's relative_attention_bias when the base model trains): the kernel
        # gives no bias gradient, so this (rare, full fine-tuning) case takes the plain-math path.
        from ptkernels.backends.eager import reference_prefix_attention
        keep = None
        if dropout_p > 0:
            keep = torch.rand(bias.shape, device=query.device) >= dropout_p
        out, _ = reference_prefix_attention(
            query, key, value, pk, pv, prefix_index=pidx, causal=causal, attention_mask=kpm,
            window=window, softcap=softcap, attn_bias=bias, scale=scaling, dropout_mask=keep,
            dropout_p=dropout_p)
        return out.transpose(1, 2).contiguous(), None
    out = prefix_attention(query, key, value, pk, pv, prefix_index=pidx, causal=causal,
                           attention_mask=kpm, window=window, softcap=softcap, attn_bias=bias,
                           scale=scaling, dropout_p=dropout_p,
                           backend=state.backend if state is not None else "auto")
    return out.transpose(1, 2).contiguous(), None


def ptkernels_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """transformers mask function: the (B, kv_length) key-padding mask, or None without padding."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask.shape[-1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register():
    """Register the attention and mask functions under ``ATTN_NAME`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_NAME, ptkernels_attention)
    AttentionMaskInterface.register(ATTN_NAME, ptkernels_mask)


# ----------------------------------------------------------------------------------------------
# Position offsets (real tokens at P..P+n-1 while a prefix is active)
# ----------------------------------------------------------------------------------------------

def _position_hook(state, site, kind, module_forward):
    def hook(module, args, kwargs):
        ctx = state.context()
        p = ctx.offset(site) if ctx is not None else 0
        if not p:
            return None
        names, got = _compat.bind(module_forward, args, kwargs)
        if kind == "bart":   # on a stack's learned positional embedding
            if got.get("position_ids") is not None:
                return _compat.replace(names, args, kwargs, "position_ids", got["position_ids"] + p)
            # the cached-length argument under whatever name this release gives it
            arg = _compat.first_accepted(module_forward, _compat.CACHE_LENGTH_ARGS)
            if arg is None:
                raise TypeError(f"{type(module).__name__}.forward takes none of "
                                f"{_compat.CACHE_LENGTH_ARGS}: cannot shift positions by the prefix")
            past = got.get(arg, 0) or 0
            return _compat.replace(names, args, kwargs, arg, past + p)
        pos = got.get("position_ids")
        if pos is not None:
            return _compat.replace(names, args, kwargs, "position_ids", pos + p)
        ids, embeds = got.get("input_ids"), got.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        n, device = ref.shape[1], ref.device
        past = _compat.cache_length_of_call(got)
        if kind in ("position_ids", "bert"):
            pos = (torch.arange(n, device=device) + past + p).unsqueeze(0)
        elif kind == "opt":
            mask = got.get("attention_mask")
            if mask is None:
                mask = torch.ones(ref.shape[0], past + n, device=device, dtype=torch.long)
            pos = ((torch.cumsum(mask, dim=1) + p) * mask - 1).long()[:, past:]
        elif kind == "roberta":
            if ids is None:   # roberta numbers inputs_embeds sequentially, prefix or not
                return None
            emb = module.embeddings
            pos = emb.create_position_ids_from_input_ids(ids, emb.padding_idx, past + p)
        else:
            return None
        return _compat.replace(names, args, kwargs, "position_ids", pos)
    return hook


def _install_position_hooks(model, state):
    kind = state.arch.positions
    if kind in (None, "t5"):
        return
    if kind == "bart":   # learned positions of both stacks (each shifts by its own prefix)
        for site, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
            target = stack.embed_positions
            state.hooks.append(target.register_forward_pre_hook(
                _position_hook(state, site, kind, target.forward), with_kwargs=True))
        return
    if kind == "opt":   # OPTForCausalLM calls model.decoder directly, skipping OPTModel
        target = model.base_model.decoder
        site = "self"
    else:
        target = model.base_model
        site = "self"
    handle = target.register_forward_pre_hook(
        _position_hook(state, site, kind, target.forward), with_kwargs=True)
    state.hooks.append(handle)


# ----------------------------------------------------------------------------------------------
# Bespoke attention: deberta-v2 (its DisentangledSelfAttention never calls get_interface)
# ----------------------------------------------------------------------------------------------

def _deberta_forward(self, hidden_states, attention_mask, output_attentions=False,
                     query_states=None, relative_pos=None, rel_embeddings=None):
    """``DisentangledSelfAttention.forward`` through ``ptkernels_attention``.

    The disentangled relative terms (c2p + p2c, already scaled) become ``attn_bias``; prefix
    columns get no relative term (prefix keys have no position), as in P-Tuning v2's DeBERTa.
    The (B, 1, n, n) mask DeBERTa builds is the outer product of the padding mask: its diagonal
    is the key-padding mask. While the bias needs a gradient (training), the plain-math path runs
    (see ``ptkernels_attention``).
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


# ----------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------

def _check_model(model):
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch_model expects a transformers PreTrainedModel or a PEFT model, got "
                        f"{type(model).__name__}")


def _validate(model, arch) -> dict:
    if get_state(model) is not None:
        raise ValueError(f"{type(model).__name__} is already patched by ptkernels "
                         "(call ptkernels.unpatch_model first)")
    sites = _arch.attention_modules(model, arch)
    expected = getattr(model.config, arch.num_layers_attr)
    for site, mods in sites.items():
        if len(mods) != expected:
            raise ValueError(f"{type(model).__name__}: found {len(mods)} {site} attention modules, "
                             f"config.{arch.num_layers_attr} = {expected}")
    if not sites:
        raise ValueError(f"{type(model).__name__}: no attention modules of class "
                         f"{'/'.join(arch.attention)} found")
    if not arch.bespoke and not type(model)._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation "
                         "(set_attn_implementation is not supported by this class)")
    if getattr(model.config, "output_attentions", False):
        raise ValueError("patch_model: config.output_attentions=True needs eager attention "
                         "(ptkernels never materializes attention probabilities)")
    return sites


def patch_base(model, *, backend: str = "auto") -> PatchState:
    """Route ``model``'s attention through ptkernels (no prompts). All-or-nothing."""
    _check_model(model)
    arch = _arch.lookup(model)
    sites = _validate(model, arch)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    state = PatchState(arch=arch, backend=backend, original_impl=model.config._attn_implementation,
                       sites=sites)
    try:
        if arch.bespoke:
            for mods in sites.values():
                for mod in mods:
                    mod.__dict__["forward"] = types.MethodType(_deberta_forward, mod)
                    state.restore.append(functools.partial(mod.__dict__.pop, "forward", None))
        else:
            register()
            model.set_attn_implementation(ATTN_NAME)
            if model.config._attn_implementation != ATTN_NAME:
                raise ValueError(f"{type(model).__name__}: set_attn_implementation did not switch "
                                 "to ptkernels")
            state.restore.append(lambda: model.set_attn_implementation(state.original_impl))
        for site, mods in sites.items():
            for i, mod in enumerate(mods):
                _MODULE_INFO[mod] = (state, site, i)
        if arch.positions == "t5":
            for site, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
                state.t5_bias[site] = stack.block[0].layer[0].SelfAttention
        _install_position_hooks(model, state)
        model._ptkernels_state = state
    except BaseException:
        _undo(model, state)
        raise
    return state


def _undo(model, state):
    for handle in state.hooks:
        handle.remove()
    state.hooks.clear()
    while state.restore:
        state.restore.pop()()
    for mods in state.sites.values():
        for mod in mods:
            if _MODULE_INFO.get(mod, (None,))[0] is state:
                del _MODULE_INFO[mod]
    if model.__dict__.get("_ptkernels_state") is state:
        del model.__dict__["_ptkernels_state"]


def patch_model(model, config=None, *, backend: str = "auto"):
    """Route a transformers (or PEFT) model's attention through ptkernels; returns the model.

    ``config`` None: outputs equal the unpatched model. A PEFT prompt-learning model keeps its own
    prompts (see ``ptkernels.integrations.peft``). All-or-nothing: on error the model is unchanged.
    """
    from ptkernels.integrations import peft as _peft
    if _peft.is_peft_model(model):
        if config is not None:
            raise ValueError("patch_model(peft_model) uses the PEFT model's own prompt config; "
                             "pass config=None")
        return _peft.patch_peft_model(model, backend=backend)
    if config is not None:
        from ptkernels.integrations.prompt_attach import patch_with_prompts
        return patch_with_prompts(model, config, backend=backend)
    patch_base(model, backend=backend)
    return model


def unpatch_model(model):
    """Undo ``patch_model`` exactly (attention implementation, forwards, hooks, prompt parameters)."""
    from ptkernels.integrations import peft as _peft
    if _peft.is_peft_model(model):
        return _peft.unpatch_peft_model(model)
    state = get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by ptkernels")
    _undo(model, state)
    return model
