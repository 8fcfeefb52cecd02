"""The demo's methods and engines: how one (method, engine) pair turns a pretrained checkpoint into
a model whose only trainable parts are the prompts and the classification head.

Engines: ``ptkernels`` (``patch_model(model, config)``), ``peft`` (stock PEFT, the baseline) and
``peft+ptkernels`` (a PEFT model patched with ``patch_model(peft_model)``: PEFT's parameters and
loop, ptkernels' attention). PEFT keeps a sequence-classification head trainable
(``modules_to_save``); ptkernels does the same by default (``train_head=True``).
"""
from __future__ import annotations

import json
import os

from ptkernels.demo.data import DemoInputError

# method -> (description, is there a PEFT equivalent)
METHODS = {
    "p-tuning-v2": "P-Tuning v2: a K/V prefix at every layer, no reparameterization",
    "prefix-tuning": "prefix-tuning: a K/V prefix at every layer through a 2-layer MLP (512 hidden)",
    "prompt-tuning": "prompt tuning: soft prompt rows prepended to the input embeddings",
    "prompt-tuning+gpc": "prompt tuning with the Global Prompt Cell (LSTM-style gate) across layers",
}
ALL_METHODS = tuple(METHODS)
PEFT_METHODS = ("p-tuning-v2", "prefix-tuning", "prompt-tuning")   # GPC has no PEFT equivalent
ENGINES = ("ptkernels", "peft", "peft+ptkernels")
PROJECTION_HIDDEN = 512
# AdamW learning rate per method when --lr is not given. 1e-2 suits the methods whose trainable
# rows are the prompts themselves. Prefix-tuning trains a 2-layer MLP (2.5M parameters here)
# whose output is every layer's K/V; its paper (Li & Liang 2021) tunes 1e-4 to 5e-3 for it. The
# demo's sweep (benchmarks/results/demo_prefix_tuning_lr/summary.md, 3 seeds per rate, 100
# steps) found 3e-4 the rate at which most seeds learn (2 of 3); at 3e-3 and 1e-2 none did.
DEFAULT_LR = {"p-tuning-v2": 1e-2, "prefix-tuning": 3e-4, "prompt-tuning": 1e-2,
              "prompt-tuning+gpc": 1e-2}


def demo_model_types() -> tuple[str, ...]:
    """Model types the demo runs: what patch_model supports that has a sequence-classification
    head and no decoder (encoder-decoder models need decoder inputs a classifier demo lacks)."""
    from ptkernels.integrations.architectures import ARCHITECTURES
    return tuple(sorted(t for t, a in ARCHITECTURES.items() if not a.is_encoder_decoder))


def check_model_dir(model_dir: str) -> str:
    """The checkpoint's model_type, or a DemoInputError, before any weights load."""
    if not os.path.isdir(model_dir):
        raise DemoInputError(f"--model: no such directory: {model_dir}")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise DemoInputError(f"--model: {model_dir} has no config.json (a Hugging Face checkpoint "
                             "directory is expected)")
    with open(cfg_path) as f:
        try:
            model_type = json.load(f).get("model_type")
        except json.JSONDecodeError as err:
            raise DemoInputError(f"--model: {cfg_path} is not valid JSON ({err})") from None
    supported = demo_model_types()
    if model_type not in supported:
        raise DemoInputError(f"--model: model_type {model_type!r} is not supported by the demo; "
                             f"supported model types: {', '.join(supported)}")
    return model_type


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:  # decoder checkpoints: pad with EOS, as is customary
        tok.pad_token = tok.eos_token
    return tok


def load_base(model_dir: str, num_labels: int, seed: int, pad_token_id=None):
    """The pretrained model with a fresh classification head initialized from ``seed``."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": expected, the head
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def ptkernels_config(method: str, tokens: int, prefix_dropout: float, train_head: bool):
    import ptkernels
    if method == "p-tuning-v2":
        return ptkernels.PTuningV2Config(tokens, prefix_dropout=prefix_dropout, train_head=train_head)
    if method == "prefix-tuning":
        return ptkernels.PrefixTuningConfig(tokens, projection_hidden_size=PROJECTION_HIDDEN,
                                            prefix_dropout=prefix_dropout, train_head=train_head)
    if method == "prompt-tuning":
        return ptkernels.PromptTuningConfig(tokens, train_head=train_head)
    if method == "prompt-tuning+gpc":
        return ptkernels.PromptTuningConfig(tokens, gpc=ptkernels.GPCConfig(), train_head=train_head)
    raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")


def peft_config(method: str, tokens: int):
    import peft
    if method == "p-tuning-v2":
        return peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens)
    if method == "prefix-tuning":
        return peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens,
                                       prefix_projection=True, encoder_hidden_size=PROJECTION_HIDDEN)
    if method == "prompt-tuning":
        return peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens)
    raise ValueError(f"method {method!r} has no PEFT equivalent (PEFT has: {PEFT_METHODS})")


def build(engine: str, method: str, model_dir: str, *, num_labels: int, seed: int, tokens: int,
          prefix_dropout: float, train_head: bool, pad_token_id=None):
    """A ready-to-train model: frozen base, trainable prompts (+ head)."""
    import torch
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    model = load_base(model_dir, num_labels, seed, pad_token_id)
    torch.manual_seed(seed + 1)  # the prompts' initialization, after the head's
    if engine == "ptkernels":
        import ptkernels
        return ptkernels.patch_model(model, ptkernels_config(method, tokens, prefix_dropout, train_head))
    import peft
    model = peft.get_peft_model(model, peft_config(method, tokens))
    _pass_prefix_cache(model)
    if engine == "peft+ptkernels":
        import ptkernels
        model = ptkernels.patch_model(model)
    return model


def _pass_prefix_cache(peft_model) -> None:
    """Let stock PEFT's prefix path reach encoder backbones of transformers 5.

    PEFT (0.21) hands the prefix to a sequence-classification backbone as ``past_key_values`` and
    refuses a backbone whose ``forward`` has no such argument; transformers 5 renamed BERT-family
    backbones' argument to ``cache`` (same Cache object). This instance-level wrapper forwards one
    name to the other and changes nothing else; it is applied only to that signature.
    """
    import inspect
    name = getattr(peft_model, "transformer_backbone_name", None)
    if name is None or peft_model.peft_config["default"].peft_type.value != "PREFIX_TUNING":
        return
    backbone = peft_model.base_model.get_submodule(name)
    params = inspect.signature(backbone.forward).parameters
    if "past_key_values" in params or "cache" not in params:
        return
    inner = backbone.forward

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return inner(*args, **kwargs)
    backbone.forward = forward


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
