"""Files a model with prompts writes: the ptkernels adapter pair (its reader is ``ptk_adapter``),
atomic directory writes, and the ``save_pretrained`` of a patched model that keeps only what
trained (what HF Trainer checkpoints call).

Imports nothing above ``state`` so the config path (``prompt_attach``) can install
``TrainableSavePretrained`` and the adapter modules can share ``write_atomically``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from ptkernels.integrations.state import get_state

FORMAT = "ptkernels-prompts"
VERSION = 1
CONFIG_NAME = "ptkernels_adapter.json"
WEIGHTS_NAME = "ptkernels_adapter.safetensors"


def present(directory) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_NAME))


def config_to_json(config) -> dict:
    fields = dataclasses.asdict(config)
    for key, value in fields.items():
        if isinstance(value, tuple):
            fields[key] = list(value)
    return {"config_class": type(config).__name__, "config": fields}


def payload(model, state) -> dict:
    """{file name: bytes} of the adapter of ``model`` (patched with a prompt config)."""
    from safetensors.torch import save as save_bytes
    module = state.prompts
    tensors = {f"prompts.{k}": v.detach().contiguous().cpu()
               for k, v in module.state_dict().items()}
    heads = [n for n in state.heads
             if any(p.requires_grad for p in model.get_submodule(n).parameters())]
    for name in heads:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"heads.{name}.{pname}"] = p.detach().contiguous().cpu()
    meta = {"format": FORMAT, "version": VERSION,
            "model_type": model.config.model_type, **config_to_json(module.config),
            "heads": heads, "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    return {CONFIG_NAME: json.dumps(meta, indent=2).encode(), WEIGHTS_NAME: save_bytes(tensors)}



def write_atomically(directory, payload: dict) -> None:
    """Write {file name: bytes} into ``directory``: temporary files first, then renames (weights
    before the JSON files that describe them)."""
    os.makedirs(directory, exist_ok=True)
    temps = {}
    try:
        for name, data in payload.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            temps[name] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        # weights first: an interrupted series of renames leaves the old config, which the
        # loaders check against the weights' shapes (a mismatch is refused, never half-loaded)
        for name in sorted(payload, key=lambda n: n.endswith(".json")):
            os.replace(temps[name], os.path.join(directory, name))
            del temps[name]
    finally:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass


TRAINABLE_WEIGHTS_NAME = "model.safetensors"   # transformers' SAFE_WEIGHTS_NAME


class TrainableSavePretrained:
    """``model.save_pretrained`` of a model patched with a prompt config (instance attribute).

    Writes only what trains: ``model.safetensors`` with the ``ptk_prompts.*`` tensors and the
    trainable task heads (full names, so HF Trainer's ``resume_from_checkpoint`` loads them with
    ``load_state_dict(strict=False)``), ``config.json``, and the ptkernels adapter pair (so
    ``ptkernels.load_prompts(base_model, directory)`` restores from a checkpoint too). The frozen
    base model is never rewritten: reload it from where it came from. Atomic per file set.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, save_directory, *args, is_main_process: bool = True, state_dict=None,
                 **kwargs):
        from safetensors.torch import save as save_bytes
        if not is_main_process:
            return
        model = self.model
        state = get_state(model)
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        full = model.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().contiguous().cpu() for k, v in full.items()
                   if k in keep or k.startswith("ptk_prompts.")}
        files = {TRAINABLE_WEIGHTS_NAME: save_bytes(tensors, metadata={"format": "pt"}),
                 "config.json": model.config.to_json_string().encode()}
        files.update(payload(model, state))
        write_atomically(save_directory, files)


def pair_paths(directory, config_name: str, weights_name: str, what: str) -> tuple[str, str]:
    """(config path, weights path) of an adapter directory, or a ValueError naming the missing file."""
    paths = os.path.join(directory, config_name), os.path.join(directory, weights_name)
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"not a {what} directory: {path} is missing")
    return paths


def read_json(path: str):
    """A JSON file's content, or a ValueError saying why it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def read_tensors(path: str) -> dict:
    """A safetensors file's tensors, or a ValueError saying why it cannot be read."""
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:   # safetensors raises its own error types on corrupt files
        raise ValueError(f"cannot read {path}: {e}") from e


def head_tensors(model, state, tensors: dict, head_prefix: str, prompt_keys) -> dict:
    """The adapter's task-head tensors, checked: [(model parameter, tensor to copy into it)].

    ``tensors``: the adapter file's tensors; keys in ``prompt_keys`` (a predicate) are the
    prompts and are skipped. Every other key must be ``head_prefix`` + the name of a parameter of
    a trainable task head with the same shape: only prompts and trainable heads are ever written,
    never a frozen base weight.
    """
    params = dict(model.named_parameters())
    heads = []
    for key, value in tensors.items():
        if prompt_keys(key):
            continue
        name = key[len(head_prefix):] if key.startswith(head_prefix) else None
        if name is None or name.split(".")[0] not in state.heads or name not in params:
            raise ValueError(f"adapter tensor {key!r} is neither a prompt nor a parameter of a "
                             f"trainable task head ({list(state.heads)}); refusing to write it")
        if params[name].shape != value.shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model's "
                             f"{name} has {tuple(params[name].shape)}")
        heads.append((params[name], value))
    return heads
