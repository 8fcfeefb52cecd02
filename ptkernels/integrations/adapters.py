"""Adapter files: ``save_prompts`` / ``load_prompts`` in PEFT's format (adapters move both ways).

PEFT models use PEFT's own save / ``set_peft_model_state_dict``; models patched with a ptkernels
config write and read ``adapter_config.json`` + ``adapter_model.safetensors``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from ptkernels.integrations import prompt_files, ptk_adapter
from ptkernels.integrations.prompt_files import write_atomically
from ptkernels.integrations.peft import is_peft_model
from ptkernels.integrations.state import get_state
from ptkernels.prompts import kv_to_peft, peft_to_kv

# Files: adapter_config.json + adapter_model.safetensors. Prefix tuning stores
# ``prompt_embeddings`` (P, L*2*token_dim) (the MLP *output* when a projection is used), prompt
# tuning stores ``prompt_embeddings`` (m, hidden); SEQ_CLS/TOKEN_CLS heads that train (P-Tuning v2)
# go in as ``base_model.<head>.<param>`` with ``modules_to_save`` naming them. Decode rule for
# prefixes: ``E.view(P, 2L, H, D)`` (rows 2i / 2i+1 = layer i's K / V); seq2seq (PEFT's
# ``num_transformer_submodules`` = 2): decoder layer i reads the layer-(2i mod L) slot.

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS",
               "seq2seq": "SEQ_2_SEQ_LM"}


def _seq2seq_slots(layers: int) -> list[int]:
    return [(2 * i) % layers for i in range(layers)]


def _ptk_prompt_state(model):
    state = get_state(model)
    module = state.prompts if state is not None else None
    if module is None:
        raise ValueError(f"{type(model).__name__} has no ptkernels prompts: patch it with "
                         "ptkernels.patch_model(model, config) (or pass a PEFT model)")
    return state, module


def _heads(model, state):
    return [n for n in state.heads if any(p.requires_grad for p in model.get_submodule(n).parameters())]


def save_prompts(model, directory) -> None:
    """Write ``model``'s prompts to ``directory`` (PEFT models: their own save).

    A model patched with a config gets PEFT's adapter pair wherever PEFT can represent its
    prompts, and the ptkernels adapter pair (``ptk_adapter``: versioned, complete) wherever PEFT
    cannot: prefix banks, Global Prompt Cells, encoder or cross-attention prefixes, seq2seq prompt
    tuning, and an MLP reparameterization (PEFT keeps only the MLP's output; the ptkernels pair
    keeps the MLP to train on). ``load_prompts`` reads the ptkernels pair when present.

    Atomic: all files are built in memory, written to temporary files in ``directory`` and
    renamed over the previous ones, so a failure half-way leaves the previous adapter loadable;
    files of the other format left from an earlier save are removed afterwards.
    """
    if is_peft_model(model):
        _save_peft_atomically(model, directory)
        return
    state, module = _ptk_prompt_state(model)
    try:
        files = _peft_payload(model, state, module)
    except _NotPeft:
        files = {}
    if not files or getattr(module, "has_mlp", False) or any(
            enc.has_mlp for enc in getattr(module, "encoders", {}).values()):
        files.update(prompt_files.payload(model, state))
    write_atomically(directory, files)
    stale = [n for n in (CONFIG_NAME, WEIGHTS_NAME, prompt_files.CONFIG_NAME,
                         prompt_files.WEIGHTS_NAME) if n not in files]
    for name in stale:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


class _NotPeft(ValueError):
    """PEFT's adapter format cannot represent these prompts (the ptkernels pair can)."""


def _peft_payload(model, state, module) -> dict:
    """{file name: bytes} of the PEFT adapter pair, or ``_NotPeft``."""
    from safetensors.torch import save as save_bytes
    spec = state.spec
    if module.num_tasks != 1:
        raise _NotPeft(f"a PEFT adapter holds one task; this prompt bank has {module.num_tasks} "
                         "(use ptkernels.prompts.extract_task first)")
    if spec.task not in _TASK_TYPES:
        raise _NotPeft(f"no PEFT task type for {type(model).__name__}")
    cfg = {"task_type": _TASK_TYPES[spec.task], "num_virtual_tokens": module.num_virtual_tokens,
           "inference_mode": True, "base_model_name_or_path": model.config._name_or_path or None,
           "revision": None, "num_transformer_submodules": 2 if spec.is_encoder_decoder else 1}
    tensors = {}
    if module.kind == "prefix":
        site = "decoder" if spec.is_encoder_decoder else "self"
        if tuple(module.sites) != (site,):
            raise _NotPeft(f"PEFT prefix tuning only has {site!r} prefixes; this module has "
                             f"{list(module.sites)}")
        enc = module.encoders[site]
        kv = enc.raw()[:, :, 0].detach()                       # (L, 2, H, P, D)
        if spec.is_encoder_decoder:
            slots = kv.clone()
            for i, j in enumerate(_seq2seq_slots(kv.shape[0])):
                if i != j and not torch.equal(kv[i], kv[j]):
                    raise _NotPeft("PEFT's seq2seq prefix layout makes decoder layer i share the "
                                     f"prefix of layer {j}; this prefix differs there")
                slots[j] = kv[i]
            kv = slots
        tensors["prompt_embeddings"] = kv_to_peft(kv).float().contiguous()
        cfg.update(peft_type="PREFIX_TUNING", num_layers=enc.num_layers,
                   token_dim=enc.num_kv_heads * enc.head_dim,
                   num_attention_heads=enc.num_kv_heads, encoder_hidden_size=spec.hidden_size,
                   prefix_projection=False)
    else:
        if module.gpc is not None:
            raise _NotPeft("the Global Prompt Cell has no PEFT equivalent; save_prompts cannot "
                             "write it as a PEFT adapter")
        if spec.is_encoder_decoder:
            raise _NotPeft("PEFT seq2seq prompt tuning uses a different layout; not supported")
        tensors["prompt_embeddings"] = module.prompts[0].detach().float().contiguous()
        cfg.update(peft_type="PROMPT_TUNING", token_dim=spec.hidden_size,
                   num_layers=None, num_attention_heads=None, prompt_tuning_init="RANDOM")
    heads = _heads(model, state)
    if heads:
        cfg["modules_to_save"] = heads
        for name in heads:
            for pname, p in model.get_submodule(name).named_parameters():
                tensors[f"base_model.{name}.{pname}"] = p.detach().contiguous()
    return {CONFIG_NAME: json.dumps(cfg, indent=2).encode(), WEIGHTS_NAME: save_bytes(tensors)}


def _save_peft_atomically(model, directory) -> None:
    """PEFT's own ``save_pretrained`` into a temporary directory beside the target, then renames."""
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ptkernels-save.", dir=directory)
    try:
        model.save_pretrained(tmp)
        names = sorted(os.listdir(tmp))
        if any(os.path.isdir(os.path.join(tmp, n)) for n in names):
            raise ValueError("PEFT wrote subdirectories (several adapters?); save_prompts writes one "
                             "adapter: use peft_model.save_pretrained for multi-adapter models")
        for name in sorted(names, key=lambda n: n == CONFIG_NAME):   # the config last
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        os.rmdir(tmp)


def _read_adapter(directory):
    cfg_path, w_path = prompt_files.pair_paths(directory, CONFIG_NAME, WEIGHTS_NAME, "PEFT adapter")
    cfg = prompt_files.read_json(cfg_path)
    tensors = prompt_files.read_tensors(w_path)
    if not isinstance(cfg, dict) or "prompt_embeddings" not in tensors:
        raise ValueError(f"{directory}: expected a prompt-learning adapter with "
                         "'prompt_embeddings'")
    for name, value in tensors.items():
        if not value.dtype.is_floating_point:
            raise ValueError(f"{w_path}: tensor {name!r} has dtype {value.dtype}, expected floats")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{w_path}: tensor {name!r} holds NaN or infinite values")
    return cfg, tensors


def _expect(cfg, key, want, directory):
    got = cfg.get(key)
    if got != want:
        raise ValueError(f"adapter in {directory} has {key}={got!r}, this model needs {want!r}")


def load_prompts(model, directory) -> None:
    """Load a PEFT prompt adapter (or one written by ``save_prompts``) into ``model``.

    A directory with a ptkernels adapter pair restores from it (``ptk_adapter.load``): into a
    model patched with the same config, or into an unpatched model, which is patched with the
    saved config first.

    Everything is checked before anything is changed (files, float and finite tensors, peft_type,
    length, layers, heads, hidden size, shapes, every tensor name); only the prompt and the
    trainable task heads are written, never a frozen base weight; a prefix module with an MLP
    reparameterization is refused (an adapter holds the prefix itself, which an MLP cannot
    reproduce exactly). On error the model is unchanged.
    """
    if not is_peft_model(model) and prompt_files.present(directory):
        ptk_adapter.load(model, directory)
        return
    cfg, tensors = _read_adapter(directory)
    emb = tensors["prompt_embeddings"]
    if is_peft_model(model):
        from peft import set_peft_model_state_dict
        mine = model.active_peft_config
        _expect(cfg, "peft_type", str(getattr(mine.peft_type, "value", mine.peft_type)), directory)
        for key in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads",
                    "num_transformer_submodules"):
            if getattr(mine, key, None) is not None:
                _expect(cfg, key, getattr(mine, key), directory)
        weight = model.prompt_encoder[model.active_adapter].embedding.weight
        if cfg.get("peft_type") == "PREFIX_TUNING" and not mine.inference_mode:
            raise ValueError("load_prompts into a training-mode PEFT prefix model: PEFT stores the "
                             "MLP output; load it with PeftModel.from_pretrained instead")
        if tuple(emb.shape) != tuple(weight.shape):
            raise ValueError(f"prompt_embeddings has shape {tuple(emb.shape)}, the model expects "
                             f"{tuple(weight.shape)}")
        saved = tuple(getattr(mine, "modules_to_save", None) or ())
        for key in tensors:
            if key != "prompt_embeddings" and not any(key.startswith(f"base_model.{m}.")
                                                      for m in saved):
                raise ValueError(f"adapter tensor {key!r} is neither the prompt nor a module the "
                                 f"PEFT config saves ({list(saved)}); refusing to write it")
        set_peft_model_state_dict(model, tensors)
        return
    state, module = _ptk_prompt_state(model)
    spec = state.spec
    if module.num_tasks != 1:
        raise ValueError("load_prompts loads one task; this prompt bank has "
                         f"{module.num_tasks} (use ptkernels.prompts.insert_task)")
    _expect(cfg, "num_virtual_tokens", module.num_virtual_tokens, directory)
    _expect(cfg, "num_transformer_submodules", 2 if spec.is_encoder_decoder else 1, directory)
    if module.kind == "prefix":
        _expect(cfg, "peft_type", "PREFIX_TUNING", directory)
        site = "decoder" if spec.is_encoder_decoder else "self"
        if site not in module.sites:
            raise ValueError(f"the adapter holds {site!r} prefixes; this module has "
                             f"{list(module.sites)}")
        enc = module.encoders[site]
        if enc.has_mlp:
            raise ValueError("this prefix module reparameterizes the prefix with an MLP "
                             "(projection_hidden_size): an adapter holds the prefix itself, which "
                             "the MLP cannot be set to exactly; load it into a model patched "
                             "without projection_hidden_size, or call model.ptk_prompts.merge() first")
        _expect(cfg, "num_layers", enc.num_layers, directory)
        _expect(cfg, "num_attention_heads", enc.num_kv_heads, directory)
        _expect(cfg, "token_dim", enc.num_kv_heads * enc.head_dim, directory)
        want = (module.num_virtual_tokens, enc.num_layers * 2 * enc.num_kv_heads * enc.head_dim)
        if tuple(emb.shape) != want:
            raise ValueError(f"prompt_embeddings has shape {tuple(emb.shape)}, expected {want}")
    else:
        _expect(cfg, "peft_type", "PROMPT_TUNING", directory)
        if cfg.get("token_dim") is not None:
            _expect(cfg, "token_dim", spec.hidden_size, directory)
        want = tuple(module.prompts.shape[1:])
        if tuple(emb.shape) != want:
            raise ValueError(f"prompt_embeddings has shape {tuple(emb.shape)}, expected {want}")
    head_tensors = prompt_files.head_tensors(model, state, tensors, "base_model.",
                                             lambda key: key == "prompt_embeddings")
    # all checks passed: write
    with torch.no_grad():
        if module.kind == "prefix":
            kv = peft_to_kv(emb, enc.num_layers, enc.num_kv_heads, enc.head_dim)
            if spec.is_encoder_decoder:
                kv = kv[_seq2seq_slots(enc.num_layers)]
            enc.set_kv(kv.to(spec.device), task=0)
        else:
            module.prompts[0].copy_(emb.to(module.prompts))
        for param, value in head_tensors:
            param.copy_(value.to(param))
