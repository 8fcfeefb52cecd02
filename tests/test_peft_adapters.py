"""save_prompts / load_prompts: PEFT's adapter format in both directions; bad files change nothing."""
import json
import os

import peft
import pytest
import torch

import peft_reference as pr
import ptkernels
import tiny_models as tm

TASK_TYPE = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


def _ours(model_type, config):
    model = tm.make(model_type)
    ptkernels.patch_model(model, config, backend="eager")
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("model_type,config", [
    ("llama", ptkernels.PrefixTuningConfig(num_virtual_tokens=5)),
    ("bert", ptkernels.PTuningV2Config(num_virtual_tokens=5, prefix_dropout=0.0,
                                       projection_hidden_size=16)),
    ("t5", ptkernels.PrefixTuningConfig(num_virtual_tokens=5, sites=["decoder"])),
    ("gpt2", ptkernels.PromptTuningConfig(num_virtual_tokens=4)),
])
def test_ptkernels_adapter_loads_in_peft(tmp_path, model_type, config):
    ours = _ours(model_type, config)
    if model_type == "t5":   # PEFT's seq2seq layout shares decoder layer i with layer 2i mod L
        prefix = ours.ptk_prompts.encoders["decoder"].prefix
        with torch.no_grad():
            prefix[1] = prefix[0]
    if config.__class__.__name__ == "PTuningV2Config":
        with torch.no_grad():
            ours.classifier.weight.normal_()
    ptkernels.save_prompts(ours, tmp_path)
    ref = peft.PeftModel.from_pretrained(tm.make(model_type), tmp_path)
    batch = tm.batch(model_type, pad="right")
    # the adapter as PEFT reads it, run through the independent reference (not PEFT's forward)
    with torch.no_grad():
        expected = pr.reference_forward(ref, **batch).logits
    got = _logits(ours, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    pr.check_upstream(lambda: _logits(ref, batch), pr.tensors_agree(expected),
                      "forward of the loaded adapter")


@pytest.mark.parametrize("model_type,projection", [("llama", True), ("roberta", False),
                                                   ("bart", False)])
def test_peft_adapter_loads_into_ptkernels(tmp_path, model_type, projection):
    task = tm.default_task(model_type)
    ref = peft.get_peft_model(tm.make(model_type), peft.PrefixTuningConfig(
        task_type=TASK_TYPE[task], num_virtual_tokens=5, prefix_projection=projection,
        encoder_hidden_size=16))
    if task == "seq_cls":
        with torch.no_grad():
            ref.base_model.classifier.modules_to_save.default.out_proj.weight.normal_()
    ref.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tm.make(model_type), tmp_path)
    cfg = (ptkernels.PTuningV2Config(num_virtual_tokens=5, prefix_dropout=0.0)
           if task == "seq_cls" else ptkernels.PrefixTuningConfig(
               num_virtual_tokens=5, sites=["decoder"] if task == "seq2seq" else None))
    ours = _ours(model_type, cfg)
    ptkernels.load_prompts(ours, tmp_path)
    batch = tm.batch(model_type, pad="left")
    with torch.no_grad():
        expected = pr.reference_forward(reloaded, **batch).logits
    got = _logits(ours, batch)
    peft_logits = lambda: _logits(reloaded, batch)  # noqa: E731
    if task == "causal_lm":
        real = batch["attention_mask"].bool()
        expected, got = expected[real], got[real]
        peft_logits = lambda: _logits(reloaded, batch)[real]  # noqa: E731
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    pr.check_upstream(peft_logits, pr.tensors_agree(expected), "forward of the saved adapter")


def test_peft_model_side_round_trip(tmp_path):
    src = peft.get_peft_model(tm.make("gpt2"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    ptkernels.patch_model(src, backend="eager")
    ptkernels.save_prompts(src, tmp_path)
    dst = peft.PeftModel.from_pretrained(tm.make("gpt2"), tmp_path)
    with torch.no_grad():
        dst.prompt_encoder.default.embedding.weight.zero_()
    ptkernels.load_prompts(dst, tmp_path)
    torch.testing.assert_close(dst.prompt_encoder.default.embedding.weight,
                               src.prompt_encoder.default.embedding.weight)


def _written(tmp_path):
    ours = _ours("llama", ptkernels.PrefixTuningConfig(num_virtual_tokens=5))
    ptkernels.save_prompts(ours, tmp_path)
    return ours


@pytest.mark.parametrize("damage,match", [
    (lambda d: json.dump({**json.load(open(d / "adapter_config.json")), "num_layers": 3},
                         open(d / "adapter_config.json.tmp", "w")), "num_layers=3"),
    (lambda d: json.dump({**json.load(open(d / "adapter_config.json")),
                          "num_attention_heads": 4}, open(d / "adapter_config.json.tmp", "w")),
     "num_attention_heads=4"),
    (lambda d: json.dump({**json.load(open(d / "adapter_config.json")), "num_virtual_tokens": 6},
                         open(d / "adapter_config.json.tmp", "w")), "num_virtual_tokens=6"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage"), "cannot read"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "cannot read"),
    (lambda d: os.remove(d / "adapter_model.safetensors"), "missing"),
])
def test_bad_adapter_changes_nothing(tmp_path, damage, match):
    _written(tmp_path)
    damage(tmp_path)
    if (tmp_path / "adapter_config.json.tmp").exists():
        os.replace(tmp_path / "adapter_config.json.tmp", tmp_path / "adapter_config.json")
    target = _ours("llama", ptkernels.PrefixTuningConfig(num_virtual_tokens=5))
    before = target.ptk_prompts.encoders["self"].prefix.detach().clone()
    with pytest.raises(ValueError, match=match):
        ptkernels.load_prompts(target, tmp_path)
    assert torch.equal(target.ptk_prompts.encoders["self"].prefix, before)


def test_save_needs_prompts(tmp_path):
    with pytest.raises(ValueError, match="no ptkernels prompts"):
        ptkernels.save_prompts(tm.make("llama"), tmp_path)
    # a Global Prompt Cell has no PEFT form: only the ptkernels adapter pair is written
    model = _ours("bert", ptkernels.PromptTuningConfig(num_virtual_tokens=3,
                                                        gpc=ptkernels.GPCConfig()))
    ptkernels.save_prompts(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    assert (tmp_path / "ptkernels_adapter.json").exists()
