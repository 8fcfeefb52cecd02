"""Checkpoints of models patched with a prompt config: ``save_prompts`` / ``load_prompts`` restore
everything that trained (banks, GPC cells, encoder and cross prefixes, MLP weights, task heads)
through the versioned ptkernels adapter pair, into a patched model or into a fresh unpatched one;
HF Trainer checkpoints hold only the trainable tensors and ``resume_from_checkpoint`` restores
them; the default Trainer keeps the ``task_ids`` column."""
from __future__ import annotations

import json
import os

import pytest
import torch

import ptkernels
import tiny_models as tm
from ptkernels import GPCConfig, PrefixTuningConfig, PromptTuningConfig, PTuningV2Config
from ptkernels.integrations import patch_model


def _logits(model, batch, task_ids=None):
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(**batch, **extra).logits


def _trained(model_type, cfg, seed=0):
    model = patch_model(tm.make(model_type), cfg).eval()
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


CASES = {
    "llama-bank-mlp": ("llama", lambda: PrefixTuningConfig(3, projection_hidden_size=8, num_tasks=3),
                       torch.tensor([2, 0, 1])),
    "bert-gpc-bank": ("bert", lambda: PromptTuningConfig(3, num_tasks=2, gpc=GPCConfig("gru")),
                      torch.tensor([1, 0, 1])),
    "t5-all-sites": ("t5", lambda: PrefixTuningConfig(3), None),
    "bert-v2-head": ("bert", lambda: PTuningV2Config(3, prefix_dropout=0.0,
                                                     projection_hidden_size=8), None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("target", ["patched", "unpatched"])
def test_save_load_restores_everything(case, target, tmp_path):
    model_type, make_cfg, task_ids = CASES[case]
    src = _trained(model_type, make_cfg())
    batch = tm.batch(model_type)
    ptkernels.save_prompts(src, tmp_path)
    meta = json.loads((tmp_path / "ptkernels_adapter.json").read_text())
    assert meta["format"] == "ptkernels-prompts" and meta["version"] == 1
    dst = tm.make(model_type)
    if target == "patched":
        patch_model(dst, make_cfg())
        assert (_logits(dst, batch, task_ids) - _logits(src, batch, task_ids)).abs().max() > 1e-3
    ptkernels.load_prompts(dst, tmp_path)   # an unpatched model is patched with the saved config
    dst.eval()
    torch.testing.assert_close(_logits(dst, batch, task_ids), _logits(src, batch, task_ids),
                               rtol=0, atol=0)
    for (n, a), (_, b) in zip(src.ptk_prompts.state_dict().items(), dst.ptk_prompts.state_dict().items()):
        assert torch.equal(a, b), n


def test_peft_pair_still_written_where_peft_can_hold_the_prompts(tmp_path):
    src = _trained("llama", PrefixTuningConfig(4, projection_hidden_size=8))
    ptkernels.save_prompts(src, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors",
                                            "ptkernels_adapter.json", "ptkernels_adapter.safetensors"]
    import peft   # PEFT reads its pair (the MLP's output); ptkernels reads its own (the MLP)
    twin = peft.PeftModel.from_pretrained(tm.make("llama"), tmp_path).eval()
    batch = tm.batch("llama", pad="right")
    torch.testing.assert_close(_logits(twin, batch), _logits(src, batch), rtol=1e-5, atol=1e-5)


def test_mismatched_or_newer_adapter_is_refused_and_changes_nothing(tmp_path):
    src = _trained("llama", PrefixTuningConfig(3, num_tasks=2))
    ptkernels.save_prompts(src, tmp_path)
    other = patch_model(tm.make("llama"), PrefixTuningConfig(4, num_tasks=2))
    before = {k: v.clone() for k, v in other.ptk_prompts.state_dict().items()}
    with pytest.raises(ValueError, match="patched with"):
        ptkernels.load_prompts(other, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.ptk_prompts.state_dict().items())
    meta = json.loads((tmp_path / "ptkernels_adapter.json").read_text())
    (tmp_path / "ptkernels_adapter.json").write_text(json.dumps({**meta, "version": 2}))
    fresh = tm.make("llama")
    with pytest.raises(ValueError, match="version 2"):
        ptkernels.load_prompts(fresh, tmp_path)
    assert ptkernels.integrations.state.get_state(fresh) is None


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def _trainer(model, out, steps, batch):
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=1e-2, lr_scheduler_type="constant",
                             save_strategy="steps", save_steps=2,
                             report_to=[], logging_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_Rows(batch))


def test_trainer_checkpoint_holds_only_prompts_and_resumes(tmp_path):
    """Default TrainingArguments (remove_unused_columns=True) keep task_ids (the forward declares
    it); checkpoints hold only the prompts; resuming from step 2 reproduces 4 straight steps."""
    from safetensors.torch import load_file
    cfg = PrefixTuningConfig(3, num_tasks=2)
    batch = tm.labelled_batch("llama", b=4, seed=5)
    batch["task_ids"] = torch.tensor([0, 1, 1, 0])

    straight = patch_model(tm.make("llama"), cfg).train()
    _trainer(straight, tmp_path / "a", 4, batch).train()

    first = patch_model(tm.make("llama"), cfg).train()
    _trainer(first, tmp_path / "b", 2, batch).train()
    ckpt = tmp_path / "b" / "checkpoint-2"
    saved = load_file(ckpt / "model.safetensors")
    assert sorted(saved) == sorted(f"ptk_prompts.{k}" for k in first.ptk_prompts.state_dict())
    resumed = patch_model(tm.make("llama"), cfg).train()
    _trainer(resumed, tmp_path / "b", 4, batch).train(resume_from_checkpoint=str(ckpt))
    for (n, a), (_, b) in zip(straight.ptk_prompts.state_dict().items(),
                              resumed.ptk_prompts.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # the checkpoint is also a ptkernels adapter directory
    fresh = tm.make("llama")
    ptkernels.load_prompts(fresh, ckpt)
    for k, v in load_file(ckpt / "model.safetensors").items():
        assert torch.equal(fresh.state_dict()[k], v)
