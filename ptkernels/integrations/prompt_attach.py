"""``patch_model(model, config)``: attach trainable prompts to a model patched by
``transformers.py``.

Builds the model's ``ModelSpec`` (with ``capture_kv``: the frozen model's real-token K/V captured
in the attention function), calls ``ptkernels.prompts.build_prompt_module``, attaches the module
as ``model.ptk_prompts``, freezes everything else (P-Tuning v2 keeps classification heads
trainable) and gives the model an instance ``forward`` that computes ``prefix_kv()`` once per call
(or prepends ``input_prompts()``, mask/labels extended, with GPC forward hooks on every layer) and
accepts ``task_ids`` (B,). ``unpatch_model`` undoes all of it through the patch state.
"""
from __future__ import annotations

import functools

import torch

from ptkernels.integrations.transformers import (PrefixContext, _bind, _undo, patch_base,
                                                 prefix_context)


def _layer_of(model, attention_module):
    """The transformer layer (an element of a ModuleList) that contains ``attention_module``."""
    names = {id(m): n for n, m in model.named_modules()}
    parts = names[id(attention_module)].split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:i - 1])) if i > 1 else model
        if isinstance(parent, torch.nn.ModuleList):
            return model.get_submodule(".".join(parts[:i]))
    raise ValueError(f"cannot find the layer of {names[id(attention_module)]}")


def capture_kv(model, state, token_ids: torch.Tensor) -> dict:
    """The frozen model's own keys/values of ``token_ids`` (n,): {site: (K, V)}, (L, Hkv, n, D)."""
    ids = token_ids.reshape(1, -1).to(model.device)
    captured: dict = {}
    state.extra["capture"] = captured
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            kwargs = {"input_ids": ids}
            if state.arch.is_encoder_decoder:
                kwargs["decoder_input_ids"] = ids
            state.extra.get("forward", model)(**kwargs)   # the unwrapped model: no prompts
    finally:
        state.extra.pop("capture", None)
        model.train(was_training)
    out = {}
    for site, mods in state.sites.items():
        ks = [captured[(site, i)][0] for i in range(len(mods))]
        vs = [captured[(site, i)][1] for i in range(len(mods))]
        out[site] = (torch.stack(ks), torch.stack(vs))
    return out


def model_spec(model, state):
    """The ``ptkernels.prompts.ModelSpec`` of a patched model (see ``prompts/spec.py``)."""
    from ptkernels.prompts.spec import ModelSpec, SiteSpec
    cfg = model.config
    hkv, d = state.arch.heads(cfg)
    sites = {name: SiteSpec(name, len(mods), hkv, d) for name, mods in state.sites.items()}
    if state.arch.positions == "t5" or (state.arch.positions == "position_ids"
                                        and cfg.model_type != "gpt2"):   # RoPE / relative
        max_pos = None
    else:
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if state.arch.positions == "roberta" and max_pos is not None:
            max_pos -= cfg.pad_token_id + 1
    task = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm",
            "ForSequenceClassification": "seq_cls", "ForTokenClassification": "token_cls",
            "ForConditionalGeneration": "seq2seq"}
    name = type(model).__name__
    return ModelSpec(
        model_type=cfg.model_type, hidden_size=model.get_input_embeddings().weight.shape[1],
        vocab_size=cfg.vocab_size, is_encoder_decoder=state.arch.is_encoder_decoder, sites=sites,
        max_positions=max_pos, dtype=next(model.parameters()).dtype, device=model.device,
        embed_tokens=model.get_input_embeddings(),
        capture_kv=lambda token_ids: capture_kv(model, state, token_ids),
        task=next((t for suffix, t in task.items() if name.endswith(suffix)), None))


def _prepend_prompts(module, state, args, kwargs, task_ids):
    """Input prompts: inputs_embeds = [prompts; embeds], mask and labels extended (PEFT style)."""
    fn = state.extra["forward"]
    names, got = _bind(fn, args, kwargs)
    got = {k: v for k, v in got.items() if v is not None}
    ids = got.pop("input_ids", None)
    embeds = got.pop("inputs_embeds", None)
    if embeds is None:
        if ids is None:
            raise ValueError("pass input_ids or inputs_embeds")
        embeds = state.extra["embed"](ids)
    b = embeds.shape[0]
    from ptkernels.prompts.bank import select_prompts
    prompts = select_prompts(module.input_prompts(), task_ids, b).to(embeds.dtype)
    m = prompts.shape[1]
    got["inputs_embeds"] = torch.cat([prompts, embeds], 1)
    mask = got.get("attention_mask")
    if mask is not None:
        got["attention_mask"] = torch.cat([mask.new_ones(b, m), mask], 1)
    if got.get("token_type_ids") is not None:
        tt = got["token_type_ids"]
        got["token_type_ids"] = torch.cat([tt.new_zeros(b, m), tt], 1)
    if got.get("position_ids") is not None:
        raise ValueError("position_ids cannot be combined with input prompts")
    labels = got.get("labels")
    if labels is not None and state.extra["spec"].task == "causal_lm":
        got["labels"] = torch.cat([labels.new_full((b, m), -100), labels], 1)
    state.extra["gpc_rows"] = (prompts, m)
    return got


def _gpc_hook(state, module):
    def hook(layer, args, output):
        rows = state.extra.get("gpc_rows")
        if rows is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        prompts, m = rows
        s = state.extra.get("gpc_state")
        if s is None:
            s = module.gpc.initial_state(prompts)
        s = module.gpc(h[:, :m], s)
        state.extra["gpc_state"] = s
        h = torch.cat([s.to(h.dtype), h[:, m:]], 1)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    return hook


def patch_with_prompts(model, config, *, backend):
    from ptkernels.prompts import build_prompt_module, trainable_head_names
    state = patch_base(model, backend=backend)
    try:
        spec = model_spec(model, state)
        module = build_prompt_module(config, spec, backend=backend)
        # A classification head stays trainable for every method (as PEFT's modules_to_save).
        heads = trainable_head_names(model) if config.train_head else []
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        state.extra.update(spec=spec, prompts=module, embed=model.get_input_embeddings(),
                           forward=model.forward)

        def restore_flags():
            for n, p in model.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
        state.restore.append(restore_flags)
        for n, p in model.named_parameters():
            p.requires_grad_(n.split(".")[0] in heads)
        model.add_module("ptk_prompts", module)
        state.restore.append(lambda: delattr(model, "ptk_prompts"))
        if module.kind == "input" and module.gpc is not None:
            site = "encoder" if state.arch.is_encoder_decoder else "self"
            for att in state.sites[site]:
                state.hooks.append(_layer_of(model, att).register_forward_hook(
                    _gpc_hook(state, module)))
        inner = state.extra["forward"]

        def forward(*args, task_ids=None, **kwargs):
            from ptkernels.prompts.bank import check_task_ids
            if module.kind == "input":
                if module.gpc is not None and model.training and any(
                        getattr(m, "gradient_checkpointing", False) for m in model.modules()):
                    raise ValueError("the Global Prompt Cell rewrites prompt rows between layers "
                                     "and does not support gradient checkpointing; disable it")
                new_kwargs = _prepend_prompts(module, state, args, kwargs, task_ids)
                try:
                    return inner(**new_kwargs)
                finally:
                    state.extra.pop("gpc_rows", None)
                    state.extra.pop("gpc_state", None)
            names, got = _bind(inner, args, kwargs)
            ref = got.get("input_ids") if got.get("input_ids") is not None else got.get("inputs_embeds")
            ids = check_task_ids(task_ids, module.num_tasks, ref.shape[0])
            ctx = PrefixContext(module.prefix_kv(), prefix_index=ids,
                                position_offset=module.position_offset)
            with prefix_context(model, ctx):
                return inner(*args, **kwargs)

        functools.update_wrapper(forward, inner)
        model.__dict__["forward"] = forward
        state.restore.append(lambda: model.__dict__.pop("forward", None))
    except BaseException:
        _undo(model, state)
        raise
    return model
