"""``patch_model(model, config)``: attach trainable prompts to a model patched by ``patching.py``.

Builds the model's ``ModelSpec`` (with ``capture_kv``: the frozen model's real-token K/V captured
by the attention function), calls ``ptkernels.prompts.build_prompt_module``, attaches the module
as ``model.ptk_prompts`` (in the model's train/eval mode), freezes everything else (P-Tuning v2
keeps the task heads trainable: ``trainable_heads``) and gives the model an instance ``forward``
(``PromptForward``) that makes each call's ``PrefixContext``: ``prefix_kv()`` once per call, or the
input prompts prepended (mask/labels extended) with the Global Prompt Cell's rows carried in the
context between layers (``GPCHook``), and accepts ``task_ids`` (B,). ``unpatch_model`` undoes all
of it through the patch state.

Generation: input prompts enter on the first call only (later calls find them in the cache, or in
``encoder_outputs``, and only extend the mask); encoder-decoders' encoder stack gets an
``EncoderForward`` because ``generate()`` calls the encoder outside the model's forward. The
model's ``save_pretrained`` becomes ``prompt_files.TrainableSavePretrained`` (only what trains).
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

from ptkernels.integrations import checkpointing, compat
from ptkernels.integrations.patching import patch_base, undo
from ptkernels.integrations.prompt_files import TrainableSavePretrained
from ptkernels.integrations.state import (GPCRun, PrefixContext, add_hook, current, get_state,
                                          use_context)
from ptkernels.prompts import ModelSpec, SiteSpec, build_prompt_module, trainable_head_names
from ptkernels.prompts.bank import check_task_ids, select_prompts

PROMPTS_ATTR = "ptk_prompts"


def trainable_heads(model, arch) -> list[str]:
    """Top-level task-head modules P-Tuning v2 keeps trainable: the generic HF heads plus the
    architecture's own (``Architecture.head_names``) when the model has a task head."""
    names = trainable_head_names(model)
    if names:
        names += [n for n in arch.head_names
                  if n not in names and isinstance(getattr(model, n, None), torch.nn.Module)]
    return names


def _layer_of(model, attention_module):
    """The transformer layer (an element of a ModuleList) that contains ``attention_module``."""
    names = {id(m): n for n, m in model.named_modules()}
    parts = names[id(attention_module)].split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:i - 1])) if i > 1 else model
        if isinstance(parent, torch.nn.ModuleList):
            return model.get_submodule(".".join(parts[:i]))
    raise ValueError(f"cannot find the layer of {names[id(attention_module)]}")


def _inner_forward(model, state):
    """The model's forward without prompts (bound)."""
    if state.previous_forward is not None:
        return state.previous_forward
    return type(model).forward.__get__(model)


def capture_kv(model, state, token_ids: torch.Tensor) -> dict:
    """The frozen model's own keys/values of ``token_ids`` (n,): {site: (K, V)}, (L, Hkv, n, D)."""
    ids = token_ids.reshape(1, -1).to(model.device)
    ctx = PrefixContext(capture={})
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), use_context(ctx):
            kwargs = {"input_ids": ids}
            if state.arch.is_encoder_decoder:
                kwargs["decoder_input_ids"] = ids
            _inner_forward(model, state)(**kwargs)   # the unwrapped model: no prompts
    finally:
        model.train(was_training)
    out = {}
    for site, mods in state.sites.items():
        ks = [ctx.capture[(site, i)][0] for i in range(len(mods))]
        vs = [ctx.capture[(site, i)][1] for i in range(len(mods))]
        out[site] = (torch.stack(ks), torch.stack(vs))
    return out


TASKS = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm",
         "ForSequenceClassification": "seq_cls", "ForTokenClassification": "token_cls",
         "ForConditionalGeneration": "seq2seq"}


def model_spec(model, state) -> ModelSpec:
    """The ``ptkernels.prompts.ModelSpec`` of a patched model (see ``prompts/spec.py``)."""
    cfg, arch = model.config, state.arch
    hkv, d = arch.heads(cfg)
    sites = {name: SiteSpec(name, len(mods), hkv, d) for name, mods in state.sites.items()}
    name = type(model).__name__
    return ModelSpec(
        model_type=cfg.model_type, hidden_size=model.get_input_embeddings().weight.shape[1],
        vocab_size=cfg.vocab_size, is_encoder_decoder=arch.is_encoder_decoder, sites=sites,
        max_positions=arch.max_positions(cfg), dtype=next(model.parameters()).dtype,
        device=model.device, embed_tokens=model.get_input_embeddings(),
        capture_kv=lambda token_ids: capture_kv(model, state, token_ids),
        task=next((t for suffix, t in TASKS.items() if name.endswith(suffix)), None))


def _prepend_prompts(model, state, module, args, kwargs, task_ids):
    """Input prompts: inputs_embeds = [prompts; embeds], mask and labels extended (PEFT style).
    Returns (kwargs of the inner call, the call's GPCRun or None)."""
    fn = _inner_forward(model, state)
    names, got = compat.bind(fn, args, kwargs)
    got = {k: v for k, v in got.items() if v is not None}
    ids = got.pop("input_ids", None)
    embeds = got.pop("inputs_embeds", None)
    if embeds is None:
        if ids is None:
            raise ValueError("pass input_ids or inputs_embeds")
        embeds = model.get_input_embeddings()(ids)
    b = embeds.shape[0]
    prompts = select_prompts(module.input_prompts(), task_ids, b).to(embeds.dtype)
    m = prompts.shape[1]
    if got.get("position_ids") is not None:
        raise ValueError("position_ids cannot be combined with input prompts")
    got["inputs_embeds"] = torch.cat([prompts, embeds], 1)
    mask = got.get("attention_mask")
    if mask is not None:
        got["attention_mask"] = torch.cat([mask.new_ones(b, m), mask], 1)
    if got.get("token_type_ids") is not None:
        tt = got["token_type_ids"]
        got["token_type_ids"] = torch.cat([tt.new_zeros(b, m), tt], 1)
    labels = got.get("labels")
    if labels is not None and state.spec.task == "causal_lm":
        got["labels"] = torch.cat([labels.new_full((b, m), -100), labels], 1)
    gpc = GPCRun(module.gpc, m, prompts) if module.gpc is not None else None
    return got, gpc


def _with_prefix(module, got: dict, task_ids, call):
    """``call()`` under this call's prefix context (the prefix methods): the prompt module's
    prefixes, each row's task from ``task_ids`` (B,) checked against the batch in ``got``."""
    ref = _batch_reference(got)
    if ref is None:
        raise ValueError("pass input_ids or inputs_embeds")
    ids = check_task_ids(task_ids, module.num_tasks, ref.shape[0])
    ctx = PrefixContext(module.prefix_kv(), prefix_index=ids, position_offset=module.position_offset)
    with use_context(ctx):
        return call()


class GPCHook:
    """Forward hook on layer ``index`` of the input site: the Global Prompt Cell updates the prompt
    rows the layer produced, from the call's ``GPCRun`` (in the call's context).

    Layer i reads the state layer i - 1 left (S0 = the prompts) and records its own: a rerun of
    the hook (transformers releases before 5.24 checkpoint ``__call__``, hooks included, so the
    recomputation inside backward runs it again) gives exactly the forward's result."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, layer, args, output):
        ctx = current()
        run = ctx.gpc if ctx is not None else None
        if run is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        m = run.rows
        state = run.original if self.index == 0 else run.states[self.index - 1]
        new = run.cell.step(h[:, :m], state, run.original)
        run.states[self.index] = new
        h = torch.cat([new.to(h.dtype), h[:, m:]], 1)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


def _batch_reference(got: dict):
    """A tensor whose first dimension is the call's batch (None when the call has none)."""
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        if got.get(name) is not None:
            return got[name]
    enc = got.get("encoder_outputs")
    if enc is not None:
        return enc[0]
    return None


def _extend_mask(got: dict, m: int) -> None:
    """Prepend m ones (the prompt rows) to the call's 2-D attention mask, in place."""
    mask = got.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        got["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], m), mask], 1)


def _prompts_already_in(got: dict) -> bool:
    """Whether the input prompts of this call were applied before it: generation past its first
    step (the cache holds the prompt rows' keys/values, or their GPC-rewritten successors) or an
    encoder-decoder call with ``encoder_outputs`` (the encoder ran with the prompts)."""
    return got.get("encoder_outputs") is not None or compat.cache_length_of_call(got) > 0


class PromptForward:
    """The prompt-carrying model's instance ``forward`` (accepts ``task_ids`` (B,)). A callable
    object holding the model, so a deep copy of the model copies it with the model."""

    def __init__(self, model):
        self.model = model

    @property
    def __signature__(self):
        state = get_state(self.model)
        sig = inspect.signature(_inner_forward(self.model, state))
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        if state.prompts.kind == "input":
            # input prompts place real tokens after the prompts themselves; without the
            # parameter, generate() does not invent position_ids from the attention mask
            params = [p for p in params if p.name != "position_ids"]
        params.append(inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
        params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
        return sig.replace(parameters=params)

    def __call__(self, *args, task_ids=None, **kwargs):
        model = self.model
        state = get_state(model)
        module = state.prompts
        inner = _inner_forward(model, state)
        checkpointing.ensure(state)
        names, got = compat.bind(inner, args, kwargs)
        if module.kind == "input":
            if _prompts_already_in(got):
                # the prompt rows are in the cache / the encoder output: only the mask grows
                got = {k: v for k, v in got.items() if v is not None}
                _extend_mask(got, module.num_virtual_tokens)
                if got.get("position_ids") is not None:
                    raise ValueError("position_ids cannot be combined with input prompts")
                return inner(**got)
            new_kwargs, gpc = _prepend_prompts(model, state, module, args, kwargs, task_ids)
            with use_context(PrefixContext(position_offset=False, gpc=gpc)):
                return inner(**new_kwargs)
        return _with_prefix(module, got, task_ids, lambda: inner(*args, **kwargs))


class EncoderForward:
    """The encoder stack's instance ``forward`` on an encoder-decoder model with prompts.

    ``generate()`` runs the encoder itself (``model.get_encoder()(...)``), outside the model's
    ``forward``: without this, that call would see no prefix context, so the encoder-site prefix
    (or the input prompts and the Global Prompt Cell) would be silently dropped. Inside the
    model's own forward a context is already active and this passes straight through; called
    alone it makes the call's context exactly as ``PromptForward`` would. Accepts ``task_ids``
    (B,) (declared in its signature, so ``generate(task_ids=...)`` hands them over)."""

    def __init__(self, model, encoder):
        self.model, self.encoder = model, encoder

    def _inner(self):
        state = get_state(self.model)
        if state.previous_encoder_forward is not None:
            return state.previous_encoder_forward
        return type(self.encoder).forward.__get__(self.encoder)

    @property
    def __signature__(self):
        sig = inspect.signature(self._inner())
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        params.append(inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
        params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
        return sig.replace(parameters=params)

    def __call__(self, *args, task_ids=None, **kwargs):
        inner = self._inner()
        if current() is not None:          # inside the model's forward: its context applies
            return inner(*args, **kwargs)
        module = get_state(self.model).prompts
        names, got = compat.bind(inner, args, kwargs)
        got = {k: v for k, v in got.items() if v is not None}
        if module.kind == "input":
            ids, embeds = got.pop("input_ids", None), got.pop("inputs_embeds", None)
            if embeds is None:
                if ids is None:
                    raise ValueError("pass input_ids or inputs_embeds")
                embeds = self.model.get_input_embeddings()(ids)
            prompts = select_prompts(module.input_prompts(), task_ids, embeds.shape[0]).to(embeds.dtype)
            got["inputs_embeds"] = torch.cat([prompts, embeds], 1)
            _extend_mask(got, prompts.shape[1])
            gpc = GPCRun(module.gpc, prompts.shape[1], prompts) if module.gpc is not None else None
            with use_context(PrefixContext(position_offset=False, gpc=gpc)):
                return inner(**got)
        return _with_prefix(module, got, task_ids, lambda: inner(**got))


def patch_with_prompts(model, config, *, backend):
    state = patch_base(model, backend=backend)
    try:
        spec = model_spec(model, state)
        module = build_prompt_module(config, spec, backend=backend)
        module.train(model.training)
        # the one place that decides which task heads stay trainable: a classification head
        # trains with every method by default (as PEFT's modules_to_save); config.train_head=False
        # keeps it frozen
        heads = trainable_heads(model, state.arch) if config.train_head else []
        # the spec outlives the build without capture_kv (a closure over this model object)
        state.spec, state.heads = dataclasses.replace(spec, capture_kv=None), tuple(heads)
        state.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad_(n.split(".")[0] in heads)
        model.add_module(PROMPTS_ATTR, module)
        state.prompts = module
        if module.kind == "input" and module.gpc is not None:
            for i, att in enumerate(state.sites[state.arch.input_site]):
                layer = _layer_of(model, att)
                add_hook(state, layer, layer.register_forward_hook(GPCHook(i)), "_forward_hooks")
        state.previous_forward = model.__dict__.get("forward")
        model.__dict__["forward"] = PromptForward(model)
        state.wrapped_forward = True
        # Trainer checkpoints and save_pretrained keep only what trains (prompts, heads)
        model.__dict__["save_pretrained"] = TrainableSavePretrained(model)
        if state.arch.is_encoder_decoder:
            encoder = model.get_encoder()
            state.previous_encoder_forward = encoder.__dict__.get("forward")
            encoder.__dict__["forward"] = EncoderForward(model, encoder)
            state.encoder = encoder
    except BaseException:
        undo_prompts(model, state)
        raise
    return model


def undo_prompts(model, state) -> None:
    """Undo ``patch_with_prompts`` (forward, prompt module, flags) and then the base patch."""
    if state.encoder is not None:
        if state.previous_encoder_forward is not None:
            state.encoder.__dict__["forward"] = state.previous_encoder_forward
        else:
            state.encoder.__dict__.pop("forward", None)
        state.encoder = state.previous_encoder_forward = None
    if isinstance(model.__dict__.get("save_pretrained"), TrainableSavePretrained):
        del model.__dict__["save_pretrained"]
    if state.wrapped_forward:
        if state.previous_forward is not None:
            model.__dict__["forward"] = state.previous_forward
        else:
            model.__dict__.pop("forward", None)
        state.wrapped_forward = False
    if state.prompts is not None and model._modules.get(PROMPTS_ATTR) is state.prompts:
        del model._modules[PROMPTS_ATTR]
    state.prompts = None
    if state.flags is not None:
        for n, p in model.named_parameters():
            if n in state.flags:
                p.requires_grad_(state.flags[n])
        state.flags = None
    undo(model, state)
