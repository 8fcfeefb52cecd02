"""patch_model(model) without prompts: outputs and gradients equal the unpatched model; unpatch
restores it exactly; bad input leaves the model untouched."""
import pytest
import torch
import transformers

import tiny_models as tm
from ptkernels.integrations import patch_model, unpatch_model
from ptkernels.integrations import patching
from ptkernels.integrations import state as st
from ptkernels.integrations import transformers as tfi

PATCHABLE = tm.ALL


def _logits(model, batch, task):
    out = model(**batch).logits
    if task == "causal_lm":   # padded query rows: HF averages masked keys, ptkernels returns 0
        return out[batch["attention_mask"].bool()]
    return out


# deberta-v2 also masks padded *query* rows (eager: a uniform softmax over all-masked rows,
# ptkernels: 0), so its [CLS] at a left pad differs by construction: right padding only.
PAD_CASES = [(m, pad) for m in PATCHABLE for pad in ("left", "right")
             if not (m == "deberta-v2" and pad == "left")]


@pytest.mark.parametrize("model_type,pad", PAD_CASES)
def test_patched_equals_unpatched(model_type, pad):
    model = tm.make(model_type)
    task = tm.default_task(model_type)
    batch = tm.batch(model_type, pad=pad)
    ref = _logits(model, batch, task)
    patch_model(model, backend="eager")
    if tfi.get_state(model).arch.bespoke_forward is None:
        assert model.config._attn_implementation == tfi.ATTN_NAME
    out = _logits(model, batch, task)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    unpatch_model(model)
    assert model.config._attn_implementation == "eager"
    assert tfi.get_state(model) is None
    torch.testing.assert_close(_logits(model, batch, task), ref, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert", "t5", "bart", "opt", "deberta-v2"])
def test_patched_gradients_of_trainable_model(model_type):
    model = tm.make(model_type).train()   # dropout is 0 in the tiny configs
    task = tm.default_task(model_type)
    batch = tm.batch(model_type, pad="right")

    def grads():
        model.zero_grad()
        _logits(model, batch, task).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    patch_model(model, backend="eager")
    got = grads()
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_model_round_trip():
    model = tm.make("llama", attn="sdpa")
    patch_model(model)
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"


def test_t5_substacks_switch():
    model = tm.make("t5")
    patch_model(model, backend="eager")
    assert model.encoder.config._attn_implementation == tfi.ATTN_NAME
    assert model.decoder.config._attn_implementation == tfi.ATTN_NAME
    unpatch_model(model)
    assert model.decoder.config._attn_implementation == "eager"


def test_unsupported_model_type_clear_error():
    cfg = transformers.GPTJConfig(vocab_size=tm.VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="model_type='gptj'.*supported model types: .*llama"):
        patch_model(model)
    assert model.config._attn_implementation == impl
    assert tfi.get_state(model) is None


def test_patch_twice_errors_and_keeps_first_patch():
    model = tm.make("llama")
    patch_model(model, backend="eager")
    state = tfi.get_state(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model)
    assert tfi.get_state(model) is state
    unpatch_model(model)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)


def test_unswitchable_attention_no_partial_patch(monkeypatch):
    model = tm.make("llama")
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="cannot switch its attention implementation"):
        patch_model(model)
    assert model.config._attn_implementation == "eager"
    assert tfi.get_state(model) is None
    assert not model.base_model._forward_pre_hooks


def test_not_a_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2))


def test_failure_during_patch_rolls_back(monkeypatch):
    model = tm.make("gpt2")

    def boom(*a, **k):
        raise RuntimeError("hook failure")
    monkeypatch.setattr(patching, "install_position_hooks", boom)
    with pytest.raises(RuntimeError, match="hook failure"):
        patch_model(model)
    assert model.config._attn_implementation == "eager"
    assert tfi.get_state(model) is None
    assert not any(st.binding_of(m) for m in model.modules())


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_sliding_window_passed_to_kernel(model_type):
    model = tm.make(model_type, sliding_window=3, use_sliding_window=True)
    batch = tm.batch(model_type, pad="left")
    real = batch["attention_mask"].bool()
    ref = model(**batch).logits[real]
    full = tm.make(model_type)(**batch).logits[real]
    assert (ref - full).abs().max() > 1e-3   # the window matters at n = 7
    patch_model(model, backend="eager")
    torch.testing.assert_close(model(**batch).logits[real], ref, atol=1e-5, rtol=1e-5)
