"""Acceptance of the prompt methods through ``patch_model(model, config)`` on tiny random models:
patched fast path == the plain eager references of ``method_references.py`` (logits and prompt
gradients), every method trains on CPU with only prompt (+ head) parameters changing, bank rows ==
single-task models, merge and save/load round trips leave outputs unchanged."""
from __future__ import annotations

import io

import pytest
import torch

import method_references as ref
import ptkernels
import tiny_models as tm
from ptkernels import GPCConfig, PrefixTuningConfig, PromptTuningConfig, PTuningV2Config
from ptkernels.integrations import patch_model
from ptkernels.prompts import extract_task


def _site(model_type):
    return "decoder" if model_type in tm.SEQ2SEQ else "self"


def _prompt_grads(model, loss):
    params = [p for p in model.ptk_prompts.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _close(a, b, what, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("model_type,cfg", [
    ("llama", PrefixTuningConfig(5, projection_hidden_size=16)),
    ("gpt2", PTuningV2Config(4, prefix_dropout=0.0)),
    ("bert", PTuningV2Config(6, prefix_dropout=0.0)),
    ("bart", PrefixTuningConfig(3, sites=["decoder"])),
], ids=["llama-prefix-mlp", "gpt2-v2", "bert-v2", "bart-decoder"])
def test_prefix_fast_path_matches_reference(model_type, cfg):
    batch = tm.labelled_batch(model_type, pad="right" if model_type == "gpt2" else "left")
    model = patch_model(tm.make(model_type), cfg)
    out = model(**batch)
    grads = _prompt_grads(model, out.loss)
    k, v = model.ptk_prompts.prefix_kv()[_site(model_type)]
    base = tm.make(model_type)
    expected = ref.prefix_forward(base, (k[:, 0], v[:, 0]), **batch)
    expected_grads = _prompt_grads(model, expected.loss)
    _close(out.logits, expected.logits, "logits")
    _close(out.loss, expected.loss, "loss")
    for g, e in zip(grads, expected_grads):
        _close(g, e, "prompt gradient")


@pytest.mark.parametrize("model_type,variant", [("bert", "lstm"), ("bert", "reinject"),
                                                ("llama", "candidate"), ("llama", "gru"),
                                                ("llama", None)])
def test_prompt_tuning_fast_path_matches_reference(model_type, variant):
    batch = tm.labelled_batch(model_type)
    gpc = GPCConfig(variant=variant) if variant else None
    model = patch_model(tm.make(model_type), PromptTuningConfig(4, gpc=gpc))
    out = model(**batch)
    grads = _prompt_grads(model, out.loss)
    mod = model.ptk_prompts
    cell = (mod.gpc.weight, mod.gpc.bias, variant) if variant else None
    expected = ref.prompt_forward(tm.make(model_type), mod.input_prompts(), gpc=cell, **batch)
    _close(out.logits, expected.logits, "logits")
    for g, e in zip(grads, _prompt_grads(model, expected.loss)):
        _close(g, e, "prompt gradient")


def _train(model, batch, steps=10, lr=1e-1, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch, **kw).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model_type,cfg,head", [
    ("llama", PrefixTuningConfig(4, projection_hidden_size=True), False),
    ("bart", PrefixTuningConfig(3), False),
    ("bert", PTuningV2Config(4), True),
    ("bert", PromptTuningConfig(4, gpc=GPCConfig()), True),
    ("bert", PrefixTuningConfig(4, train_head=False), False),
    ("gpt2", PromptTuningConfig(3, init="words", init_token_ids=[5, 6, 7]), False),
], ids=["llama-prefix-mlp", "bart-prefix-all-sites", "bert-v2", "bert-gpc", "bert-prefix-frozen-head",
     "gpt2-prompt"])
def test_every_method_trains_and_only_prompts_change(model_type, cfg, head):
    torch.manual_seed(0)
    # initializer_range 0.5: the default 0.02 gives near-uniform logits that no prompt can move far
    model = patch_model(tm.make(model_type, initializer_range=0.5, init_std=0.5), cfg)
    batch = tm.labelled_batch(model_type)
    # synthetic task the prompts alone can solve: every target is token / class 1
    batch["labels"] = torch.where(batch["labels"] == -100, -100, 1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if not n.startswith("ptk_prompts.")}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    heads = ptkernels.prompts.trainable_head_names(model)
    assert all(n.startswith("ptk_prompts.") or n.split(".")[0] in heads for n in trainable)
    assert any(n.split(".")[0] == "classifier" for n in trainable) == head
    losses = _train(model, batch)
    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen and not (head and n.split(".")[0] in heads):
            assert torch.equal(p, frozen[n]), f"{n} changed"
            assert p.grad is None, f"{n} got a gradient"


@pytest.mark.parametrize("model_type,make_cfg", [
    ("llama", lambda t: PrefixTuningConfig(3, projection_hidden_size=8, num_tasks=t)),
    ("bert", lambda t: PromptTuningConfig(3, num_tasks=t, gpc=GPCConfig())),
], ids=["llama-prefix", "bert-prompt-gpc"])
def test_bank_row_equals_single_task_model(model_type, make_cfg):
    batch = tm.labelled_batch(model_type)
    bank = patch_model(tm.make(model_type), make_cfg(3))
    ids = torch.tensor([2, 0, 2])
    out = bank(**batch, task_ids=ids).logits
    for t in (0, 2):
        single = patch_model(tm.make(model_type), make_cfg(1))
        extract_task(bank.ptk_prompts, single.ptk_prompts, t)
        rows = (ids == t).nonzero().flatten()
        expected = single(**batch).logits
        _close(out[rows], expected[rows], f"task {t}")


def test_merge_and_save_load_round_trips():
    batch = tm.labelled_batch("llama")
    cfg = PrefixTuningConfig(4, projection_hidden_size=16, prefix_dropout=0.2)
    model = patch_model(tm.make("llama"), cfg).eval()
    before = model(**batch).logits
    model.ptk_prompts.merge()
    assert not any(enc.has_mlp for enc in model.ptk_prompts.encoders.values())
    _close(model(**batch).logits, before, "after merge", tol=1e-6)
    buf = io.BytesIO()
    torch.save(model.ptk_prompts.state_dict(), buf)
    fresh = patch_model(tm.make("llama"), PrefixTuningConfig(4)).eval()
    buf.seek(0)
    fresh.ptk_prompts.load_state_dict(torch.load(buf))
    _close(fresh(**batch).logits, before, "after save/load", tol=1e-6)
    # PEFT's prompt_embeddings layout round trip
    emb = model.ptk_prompts.to_peft_embeddings("self")
    other = patch_model(tm.make("llama"), PrefixTuningConfig(4)).eval()
    other.ptk_prompts.from_peft_embeddings("self", emb)
    _close(other(**batch).logits, before, "after PEFT layout round trip", tol=1e-6)


def test_model_report_counts_prompts_and_head():
    model = patch_model(tm.make("bert"), PTuningV2Config(4))
    r = ptkernels.prompts.model_report(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert r.head_parameters == head and r.prompt_parameters == r.stored_parameters
    assert r.stored_parameters == model.ptk_prompts.encoders["self"].prefix.numel()
    assert r.base_parameters == sum(p.numel() for n, p in model.named_parameters()
                                    if not n.startswith("ptk_prompts."))
    assert "p_tuning_v2" in str(r)
    with pytest.raises(ValueError, match="patch"):
        ptkernels.prompts.model_report(tm.make("bert"))
