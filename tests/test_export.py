"""Export for serving without ptkernels: the trained prefix as a transformers cache reproduces the
patched model's logits through unpatched, stock transformers (eager and SDPA attention)."""
from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from ptkernels import PrefixTuningConfig, PTuningV2Config, PromptTuningConfig
from ptkernels.integrations import patch_model
from ptkernels.integrations.compat import cache_arg_name
from ptkernels.integrations.export import extend_mask, prefix_cache, prefix_tensors


def _trained(model_type, cfg):
    model = patch_model(tm.make(model_type, initializer_range=0.5), cfg).eval()
    with torch.no_grad():   # far from the init: an export that dropped the prefix would show
        for p in model.ptk_prompts.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("model_type,cfg,task_ids", [
    ("llama", PrefixTuningConfig(4, projection_hidden_size=8), None),
    ("gpt2", PTuningV2Config(3, prefix_dropout=0.3), None),
    ("qwen2", PrefixTuningConfig(3, num_tasks=3), torch.tensor([2, 0, 2])),
    ("bart", PrefixTuningConfig(3, sites=["decoder"]), None),
], ids=["llama-mlp", "gpt2-v2-dropout", "qwen2-bank", "bart-decoder"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_exported_cache_reproduces_patched_logits_on_stock_transformers(model_type, cfg, task_ids,
                                                                         attn):
    model = _trained(model_type, cfg)
    batch = tm.batch(model_type, pad="right")
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        expected = model(**batch, **extra).logits
        stock = tm.make(model_type, initializer_range=0.5, attn=attn).eval()   # never patched
        inputs = dict(batch)
        b = batch["input_ids"].shape[0]
        key = "decoder_attention_mask" if model.config.is_encoder_decoder else "attention_mask"
        if model.config.is_encoder_decoder:
            inputs[key] = torch.ones_like(batch["decoder_input_ids"])
        inputs[key] = extend_mask(model, inputs[key])
        inputs[cache_arg_name(stock.forward)] = prefix_cache(model, b, task_ids)
        got = stock(**inputs, use_cache=True).logits
        plain = stock(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-2, "the prefix changes nothing: the test is void"


def test_prefix_tensors_shapes_and_what_cannot_be_exported():
    model = _trained("llama", PrefixTuningConfig(5, num_tasks=2))
    k, v = prefix_tensors(model)["self"]
    assert k.shape == v.shape == (2, 2, 2, 5, 8) and not k.requires_grad   # (L, T, Hkv, P, D)
    with pytest.raises(ValueError, match="task_ids"):
        prefix_cache(model, 3)
    with pytest.raises(ValueError, match="cross"):
        prefix_cache(_trained("t5", PrefixTuningConfig(3)), 2)
    with pytest.raises(ValueError, match="no ptkernels prefix"):
        prefix_cache(_trained("llama", PromptTuningConfig(3)), 2)
