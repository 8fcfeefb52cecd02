"""``generate()`` on models patched with a prompt config, for every method and model family.

* Greedy ``generate`` (KV cache) == a no-cache greedy loop through the patched forward, tokens and
  per-step logits: prefix-tuning on decoder-only, T5 and BART (encoder, decoder and cross sites:
  generate runs the encoder outside the model's forward, and the encoder prefix must apply there
  too), prompt tuning with and without the Global Prompt Cell (decoder-only and T5), banks.
* Bank: row r of a mixed-task batch == generating row r alone with its task.
* Sampling (seeded) and beam search with the cache == the same decoding without a cache, on PEFT +
  stock transformers holding the same prompts (``save_prompts`` -> ``PeftModel.from_pretrained``)
  where PEFT can represent and decode them.
"""
from __future__ import annotations

import inspect

import peft
import pytest
import torch

import tiny_models as tm
from ptkernels import GPCConfig, PrefixTuningConfig, PromptTuningConfig, PTuningV2Config, save_prompts
from ptkernels.integrations import patch_model

STEPS = 5
EOS = 2


def _extra(task_ids):
    return {} if task_ids is None else {"task_ids": task_ids}


@torch.no_grad()
def greedy_reference(model, batch, steps=STEPS, task_ids=None):
    """No cache: every step runs the patched forward on the whole sequence so far. The EOS token
    is excluded (as generate's min_new_tokens does); decoder-only models that take position_ids
    get the ones generate derives from the mask."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    enc_dec = model.config.is_encoder_decoder
    dec = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id) if enc_dec else None
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    logits = []
    for _ in range(steps):
        if enc_dec:
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False,
                        **_extra(task_ids))
        else:
            kw = {}
            if takes_positions:
                kw["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw, **_extra(task_ids))
        step = out.logits[:, -1]
        logits.append(step)
        nxt = step.clone()
        nxt[:, EOS] = float("-inf")
        nxt = nxt.argmax(-1, keepdim=True)
        if enc_dec:
            dec = torch.cat([dec, nxt], 1)
        else:
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return (dec if enc_dec else ids), torch.stack(logits, 1)


@torch.no_grad()
def generate(model, batch, steps=STEPS, **kw):
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=steps, min_new_tokens=steps, pad_token_id=tm.PAD,
                         eos_token_id=EOS, return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


GREEDY = {
    "llama-prefix-mlp": ("llama", lambda: PrefixTuningConfig(4, projection_hidden_size=8), None),
    "gpt2-p-tuning-v2": ("gpt2", lambda: PTuningV2Config(3, prefix_dropout=0.0), None),
    "llama-prompt": ("llama", lambda: PromptTuningConfig(3), None),
    "llama-prompt-gpc": ("llama", lambda: PromptTuningConfig(3, gpc=GPCConfig()), None),
    "llama-prefix-bank": ("llama", lambda: PrefixTuningConfig(3, num_tasks=3), torch.tensor([2, 0, 1])),
    "llama-prompt-bank": ("llama", lambda: PromptTuningConfig(3, num_tasks=2), torch.tensor([1, 0, 1])),
    "t5-prefix-all-sites": ("t5", lambda: PrefixTuningConfig(3), None),
    "bart-prefix-all-sites": ("bart", lambda: PrefixTuningConfig(3), None),
    "t5-prompt-gpc": ("t5", lambda: PromptTuningConfig(3, gpc=GPCConfig()), None),
}


def _model(model_type, cfg):
    # initializer_range 0.5: distinct logits, so argmax decisions are far from ties
    model = patch_model(tm.make(model_type, initializer_range=0.5, init_std=0.5), cfg).eval()
    with torch.no_grad():   # prompts far from their init, so a dropped prompt changes tokens
        for p in model.ptk_prompts.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", list(GREEDY))
def test_greedy_generate_equals_no_cache_loop(case):
    model_type, make_cfg, task_ids = GREEDY[case]
    model = _model(model_type, make_cfg())
    batch = tm.batch(model_type)
    expected, expected_logits = greedy_reference(model, batch, task_ids=task_ids)
    got, logits = generate(model, batch, do_sample=False, **_extra(task_ids))
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, expected)


def test_greedy_reference_sees_the_prompts():
    """The comparison above means something: without the prompts the tokens differ."""
    model = _model("t5", PrefixTuningConfig(3, sites=["encoder"]))
    batch = tm.batch("t5")
    with_prompts, _ = greedy_reference(model, batch)
    plain, _ = greedy_reference(tm.make("t5", initializer_range=0.5, init_std=0.5), batch)
    assert not torch.equal(with_prompts, plain)


@pytest.mark.parametrize("model_type,make_cfg", [
    ("llama", lambda: PrefixTuningConfig(3, projection_hidden_size=8, num_tasks=3)),
    ("llama", lambda: PromptTuningConfig(3, num_tasks=3, gpc=GPCConfig())),
    ("t5", lambda: PrefixTuningConfig(3, num_tasks=3)),
], ids=["llama-prefix", "llama-prompt-gpc", "t5-prefix"])
def test_bank_row_generates_like_its_task_alone(model_type, make_cfg):
    model = _model(model_type, make_cfg())
    batch = tm.batch(model_type)
    task_ids = torch.tensor([2, 0, 1])
    mixed, mixed_logits = generate(model, batch, do_sample=False, task_ids=task_ids)
    for r in range(3):
        row = {k: v[r:r + 1] for k, v in batch.items()}
        alone, alone_logits = generate(model, row, do_sample=False, task_ids=task_ids[r:r + 1])
        torch.testing.assert_close(mixed_logits[r:r + 1], alone_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(mixed[r:r + 1], alone), f"row {r}"


def _peft_twin(model, model_type, tmp_path):
    """PEFT + stock transformers holding ``model``'s prompts (loaded from its saved adapter)."""
    save_prompts(model, tmp_path)
    return peft.PeftModel.from_pretrained(
        tm.make(model_type, initializer_range=0.5, init_std=0.5), tmp_path).eval()


@pytest.mark.parametrize("cfg", [PrefixTuningConfig(4), PromptTuningConfig(3, gpc=GPCConfig()),
                                 PromptTuningConfig(3)], ids=["prefix", "prompt-gpc", "prompt"])
@pytest.mark.parametrize("decoding", [dict(do_sample=True, top_k=0, temperature=0.7),
                                      dict(num_beams=3, do_sample=False)], ids=["sample", "beam"])
def test_sampling_and_beam_equal_no_cache_decoding(cfg, decoding, tmp_path):
    """Seeded sampling and beam search with the cache == the same decoding without a cache.

    The no-cache side runs on PEFT + stock transformers holding the same prompts where PEFT can
    (prompt tuning without GPC). PEFT 0.21's prefix-tuning generate disagrees with its own
    forward under transformers 5.24 (its cache handling predates the ``cache`` argument), and
    PEFT has no GPC; there the no-cache side is the patched forward itself, which the greedy
    tests and tests/test_peft_prefix.py tie to PEFT's forward and the eager references."""
    model = _model("llama", cfg)
    peft_can = isinstance(cfg, PromptTuningConfig) and cfg.gpc is None
    reference = _peft_twin(model, "llama", tmp_path) if peft_can else model
    batch = tm.batch("llama", pad="none")   # PEFT ignores position_ids: no padding to disagree on
    runs = []
    for m, use_cache in ((model, True), (reference, False)):
        torch.manual_seed(123)
        runs.append(generate(m, batch, use_cache=use_cache, **decoding))
    (got, logits), (expected, expected_logits) = runs
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, expected)
