"""patch_model(peft_model): PEFT prefix tuning (with/without projection), prompt tuning and
p-tuning give the logits, loss and prompt gradients of the method with the prefix kept outside the
cache.

The truth is an independent reference (``peft_reference``: PEFT's own prompt parameters, decoded by
the test, through the unpatched transformers model). PEFT's own forward is checked against the same
reference afterwards; where PEFT fails for this transformers/PEFT pair the test reports an
upstream xfail, after every ptkernels assertion has passed."""
import peft
import pytest
import torch

import peft_reference as pr
import tiny_models as tm
from ptkernels.integrations import compat
from ptkernels.integrations import patch_model, unpatch_model
from ptkernels.integrations import transformers as tfi

TASK_TYPE = tm.PEFT_TASK_TYPE


def _run(model, batch, task, prompt_len=0, forward=None):
    """(real-row logits, loss, {trainable name: grad}) of ``forward(**batch)`` (default: model)."""
    model.zero_grad()
    out = (forward or model)(**batch)
    logits = out.logits
    if task == "causal_lm":   # compare real (unpadded) query rows only
        mask = batch["attention_mask"].bool()
        if prompt_len:
            mask = torch.cat([torch.ones(mask.shape[0], prompt_len, dtype=torch.bool), mask], 1)
        logits = logits[mask]
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), out.loss.detach(), grads


def _compare(ref, got):
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    assert ref[2].keys() == got[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-5, rtol=1e-4, msg=name)


CASES = [(mt, proj, pad) for mt in ("llama", "qwen3", "gemma2", "gpt2", "gpt_neox", "opt",
                                     "bert", "roberta", "t5", "bart")
         for proj, pad in ((False, "left"), (True, "right"))]
CASES += [(mt, False, "right") for mt in ("mistral", "qwen2", "phi3", "xlm-roberta")]


CASES += [("llama:seq_cls", False, "left"), ("gpt2:seq_cls", True, "right")]


def _run_reference(model, batch, task, prompt_len=0):
    """``_run`` through the independent reference (PEFT's parameters, unpatched model)."""
    return _run(model, batch, task, prompt_len,
                forward=lambda **inputs: pr.reference_forward(model, **inputs))


def _agrees_with(ref):
    def agrees(got):
        try:
            _compare(ref, got)
            return True
        except AssertionError:
            return False
    return agrees


@pytest.mark.parametrize("model_type,projection,pad", CASES)
def test_prefix_tuning_matches_peft(model_type, projection, pad):
    model_type, _, task = model_type.partition(":")
    task = task or tm.default_task(model_type)
    model = peft.get_peft_model(tm.make(model_type, task), peft.PrefixTuningConfig(
        task_type=TASK_TYPE[task], num_virtual_tokens=5, prefix_projection=projection,
        encoder_hidden_size=16))
    model.train()   # tiny configs have dropout 0; the MLP path is the training path
    batch = tm.labelled_batch(model_type, task, pad=pad)
    ref = _run_reference(model, batch, task)
    patch_model(model, backend="eager")
    got = _run(model, batch, task)
    _compare(ref, got)
    # only prompt parameters (and PEFT's seq-cls head copy) train
    assert all(n.startswith("prompt_encoder") or "modules_to_save" in n for n in got[2])
    unpatch_model(model)
    assert "forward" not in model.__dict__ and tfi.get_state(model.get_base_model()) is None
    pr.check_upstream(lambda: _run(model, batch, task), _agrees_with(ref), "prefix-tuning forward")


def test_prefix_not_in_cache_and_no_batch_copy():
    model = peft.get_peft_model(tm.make("llama"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5))
    patch_model(model, backend="eager")
    batch = tm.batch("llama")
    seen = []
    orig = tfi.prefix_attention

    def spy(q, k, v, pk=None, pv=None, **kw):
        seen.append((tuple(k.shape), None if pk is None else tuple(pk.shape)))
        return orig(q, k, v, pk, pv, **kw)
    tfi.prefix_attention = spy
    try:
        out = model(**batch, use_cache=True)
    finally:
        tfi.prefix_attention = orig
    n = batch["input_ids"].shape[1]
    assert seen and all(k[2] == n and pk == (2, 5, 8) for k, pk in seen)   # shared (Hkv, P, D)
    assert compat.cache_length(compat.output_cache(out)) == n


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "t5"])
def test_generate_matches_peft(model_type):
    task = tm.default_task(model_type)
    model = peft.get_peft_model(tm.make(model_type), peft.PrefixTuningConfig(
        task_type=TASK_TYPE[task], num_virtual_tokens=5))
    batch = tm.batch(model_type, pad="left")
    batch.pop("decoder_input_ids", None)
    steps = 4
    kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    base = model.get_base_model()
    with torch.no_grad():
        ref_seq, ref_scores = pr.greedy_no_cache(
            lambda **inputs: pr.reference_forward(model, **inputs), base, batch, steps)
    patch_model(model, backend="eager")
    got = model.generate(**batch, **kw)
    assert torch.equal(got.sequences, ref_seq)
    for a, b in zip(ref_scores, got.scores):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    unpatch_model(model)
    pr.check_upstream(lambda: model.generate(**batch, **kw).sequences,
                      lambda seq: torch.equal(seq, ref_seq), "generate with prefix tuning")


@pytest.mark.parametrize("model_type", tm.DECODERS)
def test_cached_step_without_position_ids_equals_recompute(model_type):
    """A cached decode step called without position_ids puts the new token at P + cache length
    (the cache argument is read under the name this transformers release gives it)."""
    model = peft.get_peft_model(tm.make(model_type), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5))
    patch_model(model, backend="eager")
    ids = tm.batch(model_type, pad="none")["input_ids"]
    arg = compat.cache_arg_name(model.get_base_model().forward)
    with torch.no_grad():
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], use_cache=True, **{arg: compat.output_cache(first)})
        full = model(input_ids=ids)
        ref = pr.reference_forward(model, input_ids=ids)
    torch.testing.assert_close(full.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_input_prompts_match_peft(method, model_type):
    task = tm.default_task(model_type)
    if method == "prompt":
        cfg = peft.PromptTuningConfig(task_type=TASK_TYPE[task], num_virtual_tokens=4)
    else:
        cfg = peft.PromptEncoderConfig(task_type=TASK_TYPE[task], num_virtual_tokens=4,
                                       encoder_hidden_size=16)
    model = peft.get_peft_model(tm.make(model_type), cfg)
    batch = tm.labelled_batch(model_type, task, pad="left")
    ref = _run_reference(model, batch, task, prompt_len=4)
    patch_model(model, backend="eager")
    assert model.get_base_model().config._attn_implementation == tfi.ATTN_NAME
    _compare(ref, _run(model, batch, task, prompt_len=4))
    unpatch_model(model)
    assert model.get_base_model().config._attn_implementation == "eager"
    pr.check_upstream(lambda: _run(model, batch, task, prompt_len=4), _agrees_with(ref),
                      f"{method} forward")


def test_peft_config_that_does_not_fit_leaves_model_untouched():
    model = peft.get_peft_model(tm.make("llama"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5))
    model.active_peft_config.num_layers = 3
    with pytest.raises(ValueError, match="does not fit the model"):
        patch_model(model)
    base = model.get_base_model()
    assert base.config._attn_implementation == "eager"
    assert tfi.get_state(base) is None
    assert "forward" not in model.__dict__


def test_peft_patch_twice_errors():
    model = peft.get_peft_model(tm.make("gpt2"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3))
    patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model)
    unpatch_model(model)
    assert "forward" not in model.__dict__


def test_trainer_steps_match_unpatched_peft(tmp_path):
    import transformers
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(3, tm.VOCAB, (6,), generator=g),
             "labels": torch.randint(3, tm.VOCAB, (6,), generator=g),
             "attention_mask": torch.ones(6, dtype=torch.long)} for _ in range(4)]

    def train(patched):
        model = peft.get_peft_model(tm.make("llama"), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3))
        if patched:
            patch_model(model, backend="eager")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), max_steps=2, per_device_train_batch_size=2,
            report_to=[], use_cpu=True, save_strategy="no", learning_rate=0.1, seed=0,
            disable_tqdm=True)
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
        return model.prompt_encoder.default.embedding.weight.detach()
    torch.testing.assert_close(train(True), train(False), atol=1e-5, rtol=1e-5)
