"""Adversarial use of the public API: each case asserts the clear error (or the exact result) and
that the model's parameters, flags, patch state and outputs are unchanged after a refused call.

Groups: op arguments (prefix_attention, gpc_cell), configs, patch / unpatch sequences, calls on a
patched model, copies, adapter files (corrupt, truncated, mismatched, hostile keys, failures
injected into saves), threads and checkpointing."""
import copy
import json
import os
import threading

import peft
import pytest
import torch

import ptkernels
import tiny_models as tm
from ptkernels import GPCConfig, PrefixTuningConfig, PromptTuningConfig, PTuningV2Config
from ptkernels.backends import eager
from ptkernels.integrations import adapters
from ptkernels.integrations.state import binding_of, get_state

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def snapshot(model):
    """Everything a refused call must leave as it was."""
    return dict(
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        flags={n: p.requires_grad for n, p in model.named_parameters()},
        impl=model.config._attn_implementation, state=get_state(model),
        forward=model.__dict__.get("forward"), training=model.training,
        modules=[n for n, _ in model.named_modules()],
        hooks=sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        bound=sum(binding_of(m) is not None for m in model.modules()))


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["params"].keys() == snap["params"].keys()
    for n, p in snap["params"].items():
        assert torch.equal(now["params"][n], p), f"{n} changed"
    for key in ("flags", "impl", "forward", "training", "modules", "hooks", "bound"):
        assert now[key] == snap[key], key
    assert now["state"] is snap["state"]


def logits(model, batch=None, **kw):
    batch = batch or tm.batch(model.config.model_type, pad="right")
    with torch.no_grad():
        return model(**batch, **kw).logits


def patched(model_type="llama", config=None, **make_kw):
    model = tm.make(model_type, **make_kw)
    ptkernels.patch_model(model, config, backend="eager")
    return model


def attn_args(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(q=torch.randn(2, 4, 5, 8, generator=g), k=torch.randn(2, 2, 7, 8, generator=g),
              v=torch.randn(2, 2, 7, 8, generator=g), prefix_k=torch.randn(2, 3, 8, generator=g),
              prefix_v=torch.randn(2, 3, 8, generator=g), backend="eager")
    kw.update(over)
    return kw


@pytest.fixture
def no_kernel(monkeypatch):
    """Errors must come before any work: any backend kernel call fails the test."""
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the argument check")
    monkeypatch.setattr(eager, "prefix_attention_fwd", boom)
    monkeypatch.setattr(eager, "gpc_cell_fwd", boom)


# ----------------------------------------------------------------------------------------------
# prefix_attention arguments
# ----------------------------------------------------------------------------------------------

ADDITIVE = torch.zeros(2, 7)
ADDITIVE[0, :2] = float("-inf")
BAD_OP = [
    ("additive float mask", dict(attention_mask=ADDITIVE), ValueError, "keep-mask"),
    ("fractional mask", dict(attention_mask=torch.full((2, 7), 0.5)), ValueError, "keep-mask"),
    ("complex mask", dict(attention_mask=torch.ones(2, 7, dtype=torch.complex64)), TypeError,
     "attention_mask must be bool"),
    ("nan scale", dict(scale=float("nan")), ValueError, "scale must be a positive finite"),
    ("inf scale", dict(scale=float("inf")), ValueError, "scale must be a positive finite"),
    ("zero scale", dict(scale=0.0), ValueError, "scale must be a positive finite"),
    ("negative scale", dict(scale=-0.5), ValueError, "scale must be a positive finite"),
    ("bool scale", dict(scale=True), TypeError, "scale must be None or a number"),
    ("inf softcap", dict(softcap=float("inf")), ValueError, "softcap must be None or a positive finite"),
    ("nan softcap", dict(softcap=float("nan")), ValueError, "softcap must be None or a positive finite"),
    ("zero softcap", dict(softcap=0.0), ValueError, "softcap must be None or a positive finite"),
    ("index out of range", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8),
                                prefix_index=torch.tensor([0, 3])), IndexError, "prefix_index values"),
    ("float index", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8),
                         prefix_index=torch.tensor([0.0, 1.0])), TypeError, "prefix_index must be an integer"),
    ("negative dropout", dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    ("bool window", dict(window=True), ValueError, "window must be None or a positive int"),
    ("unknown backend", dict(backend="bogus"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("what,over,exc,match", BAD_OP, ids=[b[0] for b in BAD_OP])
def test_prefix_attention_refuses(what, over, exc, match, no_kernel):
    kw = attn_args(**over)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=match):
        ptkernels.prefix_attention(**kw)
    for k, v in before.items():
        assert torch.equal(kw[k], v) or (torch.isnan(v).any() and k == "attention_mask")


def test_float_zero_one_mask_equals_bool_mask():
    m = torch.tensor([[0.0] * 2 + [1.0] * 5, [1.0] * 7])
    a = ptkernels.prefix_attention(**attn_args(attention_mask=m, causal=True))
    b = ptkernels.prefix_attention(**attn_args(attention_mask=m.bool(), causal=True))
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 4, 5, 8), (2, 4, 0, 8)], ids=["B=0", "Nq=0"])
def test_empty_batch_or_queries_give_empty_results(shape):
    b = shape[0]
    q = torch.randn(*shape, requires_grad=True)
    k, v = torch.randn(b, 2, 7, 8), torch.randn(b, 2, 7, 8)
    out, lse = ptkernels.prefix_attention(q, k, v, torch.randn(2, 3, 8), torch.randn(2, 3, 8),
                                          return_lse=True, causal=True)
    assert out.shape == shape and lse.shape == shape[:3] and lse.dtype == torch.float32
    out.sum().backward()
    assert q.grad.shape == shape


def test_no_keys_at_all_gives_zeros():
    q = torch.randn(2, 4, 3, 8)
    k = torch.randn(2, 2, 0, 8)
    assert torch.equal(ptkernels.prefix_attention(q, k, k), torch.zeros(2, 4, 3, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_one_query_row_stays_in_that_row(bad, prefix, causal):
    """Documented: every other row is bit-identical to the clean run; the corrupted row itself
    comes back NaN, output and lse (torch's CPU flash kernel alone would return 0 there)."""
    over = dict(causal=causal) if prefix else dict(causal=causal, prefix_k=None, prefix_v=None)
    kw = attn_args(**over)
    kw["q"][1, 2, 3, 0] = bad
    out, lse = ptkernels.prefix_attention(**kw, return_lse=True)
    row = torch.zeros(out.shape[:-1], dtype=torch.bool)
    row[1, 2, 3] = True
    ref, ref_lse = ptkernels.prefix_attention(**attn_args(**over), return_lse=True)
    assert torch.equal(out[~row], ref[~row]) and torch.equal(lse[~row], ref_lse[~row])
    assert bool(torch.isnan(out[1, 2, 3]).all()) and bool(torch.isnan(lse[1, 2, 3]))


# ----------------------------------------------------------------------------------------------
# gpc_cell arguments
# ----------------------------------------------------------------------------------------------

def _gpc(**over):
    kw = dict(update=torch.randn(2, 3, 4), state=torch.randn(2, 3, 4), weight=torch.randn(8, 8),
              bias=torch.randn(8))
    kw.update(over)
    return kw


BAD_GPC = [
    ("variant None", dict(variant=None), TypeError, "variant must be a string"),
    ("variant list", dict(variant=["lstm"]), TypeError, "variant must be a string"),
    ("variant unknown", dict(variant="bogus"), ValueError, "variant must be one of"),
    ("weight shape", dict(weight=torch.randn(8, 4)), ValueError, "weight must have shape"),
    ("state shape", dict(state=torch.randn(2, 4, 4)), ValueError, "state must have shape"),
    ("zero hidden", dict(update=torch.randn(2, 3, 0), state=torch.randn(2, 3, 0),
                         weight=torch.randn(0, 0), bias=torch.randn(0)), ValueError, "hidden size"),
    ("update rank", dict(update=torch.randn(3, 4)), ValueError, "update must have 3 dimensions"),
    ("bias dtype", dict(bias=torch.randn(8, dtype=torch.float64)), TypeError, "bias has dtype"),
]


@pytest.mark.parametrize("what,over,exc,match", BAD_GPC, ids=[b[0] for b in BAD_GPC])
def test_gpc_cell_refuses(what, over, exc, match, no_kernel):
    with pytest.raises(exc, match=match):
        ptkernels.gpc_cell(**_gpc(**over))


@pytest.mark.parametrize("b,m", [(0, 3), (2, 0)])
def test_gpc_cell_empty_batch(b, m, no_kernel):
    out = ptkernels.gpc_cell(torch.randn(b, m, 4), torch.randn(m, 4), torch.randn(8, 8), torch.randn(8))
    assert out.shape == (b, m, 4)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("tokens 0", lambda: PrefixTuningConfig(num_virtual_tokens=0), ValueError, "num_virtual_tokens must be >= 1"),
    ("tokens -1", lambda: PTuningV2Config(num_virtual_tokens=-1), ValueError, "num_virtual_tokens must be >= 1"),
    ("tokens float", lambda: PromptTuningConfig(num_virtual_tokens=2.5), TypeError, "num_virtual_tokens must be an int"),
    ("tokens bool", lambda: PrefixTuningConfig(num_virtual_tokens=True), TypeError, "num_virtual_tokens must be an int"),
    ("dropout 1", lambda: PTuningV2Config(4, prefix_dropout=1.0), ValueError, "prefix_dropout"),
    ("tasks 0", lambda: PrefixTuningConfig(4, num_tasks=0), ValueError, "num_tasks must be >= 1"),
    ("init", lambda: PrefixTuningConfig(4, init="bogus"), ValueError, "init must be one of"),
    ("sites", lambda: PrefixTuningConfig(4, sites=["bogus"]), ValueError, "sites must be distinct"),
    ("gpc variant", lambda: GPCConfig(variant="x"), ValueError, "variant must be one of"),
    ("words without ids", lambda: PromptTuningConfig(4, init="words"), ValueError, "needs init_token_ids"),
    ("negative ids", lambda: PromptTuningConfig(4, init="words", init_token_ids=[-1]), ValueError, "token ids >= 0"),
]


@pytest.mark.parametrize("what,make,exc,match", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_config_refused_at_construction(what, make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ----------------------------------------------------------------------------------------------
# patch / unpatch sequences: refused patches leave the model exactly as it was
# ----------------------------------------------------------------------------------------------

def _mutated_tokens():
    cfg = PrefixTuningConfig(4)
    cfg.num_virtual_tokens = 0          # changed after construction: checked again at patch time
    return cfg


BAD_PATCH = [
    ("unknown backend", "llama", lambda: None, dict(backend="bogus"), ValueError, "backend must be one of"),
    ("backend type", "llama", lambda: None, dict(backend=3), TypeError, "backend must be a string"),
    ("backend with config", "llama", lambda: PrefixTuningConfig(4), dict(backend="fast"), ValueError,
     "backend must be one of"),
    ("mutated config", "llama", _mutated_tokens, {}, ValueError, "num_virtual_tokens must be >= 1"),
    ("prompt ids >= vocab", "llama", lambda: PromptTuningConfig(2, init="words", init_token_ids=[5, tm.VOCAB]),
     {}, ValueError, "init_token_ids must be < vocab_size"),
    ("prefix ids >= vocab", "gpt2", lambda: PrefixTuningConfig(2, init="words", init_token_ids=[5, 500]),
     {}, ValueError, "init_token_ids must be < vocab_size"),
    ("missing site", "llama", lambda: PrefixTuningConfig(4, sites=["cross"]), {}, ValueError, "sites"),
    ("too long for positions", "gpt2", lambda: PrefixTuningConfig(200), {}, ValueError, "positions"),
    ("config type", "llama", lambda: {"num_virtual_tokens": 4}, {}, TypeError, "config must be"),
]


@pytest.mark.parametrize("what,model_type,cfg,kw,exc,match", BAD_PATCH, ids=[b[0] for b in BAD_PATCH])
def test_refused_patch_changes_nothing(what, model_type, cfg, kw, exc, match):
    model = tm.make(model_type)
    ref = logits(model)
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        ptkernels.patch_model(model, cfg(), **kw)
    assert_unchanged(model, snap)
    assert torch.equal(logits(model), ref)


def test_patch_twice_keeps_the_first_patch():
    model = patched("llama", PrefixTuningConfig(4))
    snap, ref = snapshot(model), logits(model)
    with pytest.raises(ValueError, match="already patched"):
        ptkernels.patch_model(model, PTuningV2Config(4))
    assert_unchanged(model, snap)
    assert torch.equal(logits(model), ref)


def test_output_attentions_config_refused_at_patch():
    model = tm.make("llama", output_attentions=True)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="output_attentions"):
        ptkernels.patch_model(model)
    assert_unchanged(model, snap)


def test_unpatch_of_unpatched_model_refused():
    model = tm.make("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not patched"):
        ptkernels.unpatch_model(model)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("config", [None, PTuningV2Config(4), PromptTuningConfig(3, gpc=GPCConfig())],
                         ids=["attention", "ptv2", "gpc"])
def test_unpatch_restores_everything(config):
    model = tm.make("bert")
    snap, ref = snapshot(model), logits(model)
    ptkernels.patch_model(model, config, backend="eager")
    ptkernels.unpatch_model(model)
    assert_unchanged(model, snap)
    assert torch.equal(logits(model), ref)


def test_peft_model_with_config_refused():
    model = peft.get_peft_model(tm.make("llama"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    snap = snapshot(model.get_base_model())
    with pytest.raises(ValueError, match="pass config=None"):
        ptkernels.patch_model(model, PrefixTuningConfig(4))
    assert_unchanged(model.get_base_model(), snap)


def test_base_of_peft_prefix_model_refused():
    """A PEFT prefix model's base plus a ptkernels config would apply both prefixes."""
    model = peft.get_peft_model(tm.make("llama"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    base = model.get_base_model()
    snap = snapshot(base)
    with pytest.raises(ValueError, match="base model of a PEFT"):
        ptkernels.patch_model(base, PTuningV2Config(4))
    assert_unchanged(base, snap)


def test_peft_model_over_patched_base_refused():
    base = patched("llama", PrefixTuningConfig(4))
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                             num_virtual_tokens=4))
    with pytest.raises(ValueError, match="already patched"):
        ptkernels.patch_model(model)


# ----------------------------------------------------------------------------------------------
# calls on a patched model
# ----------------------------------------------------------------------------------------------

def test_output_attentions_call_is_an_error_and_changes_nothing():
    model = patched("llama", PrefixTuningConfig(4))
    snap, ref = snapshot(model), logits(model)
    with pytest.raises(ValueError, match="output_attentions=True"):
        logits(model, output_attentions=True)
    assert_unchanged(model, snap)
    assert torch.equal(logits(model), ref)


def test_output_attentions_on_attention_only_patch():
    model = patched("gpt2")
    with pytest.raises(ValueError, match="output_attentions=True"):
        logits(model, output_attentions=True)


def test_output_attentions_in_seq2seq_generate():
    model = patched("t5", PrefixTuningConfig(3))
    batch = tm.batch("t5")
    batch.pop("decoder_input_ids")
    with pytest.raises(ValueError, match="output_attentions=True"):
        model.generate(**batch, max_new_tokens=2, output_attentions=True,
                       return_dict_in_generate=True)


@pytest.mark.parametrize("task_ids,exc,match", [
    (torch.tensor([0, 2, 1]), ValueError, r"task_ids must lie in \[0, 2\)"),
    (torch.tensor([0.0, 1.0, 1.0]), TypeError, "task_ids must be an integer"),
    (torch.tensor([0, 1]), ValueError, r"task_ids must be a \(B,\)"),
    (None, ValueError, "pass task_ids"),
], ids=["range", "float", "length", "missing"])
def test_bad_task_ids_change_nothing(task_ids, exc, match):
    model = patched("llama", PrefixTuningConfig(4, num_tasks=2))
    ids = torch.tensor([1, 0, 1])
    snap, ref = snapshot(model), logits(model, task_ids=ids)
    with pytest.raises(exc, match=match):
        logits(model, task_ids=task_ids)
    assert_unchanged(model, snap)
    assert torch.equal(logits(model, task_ids=ids), ref)


def test_eval_model_patching_keeps_prompt_dropout_off():
    model = patched("bert", PTuningV2Config(4, prefix_dropout=0.5))
    assert not model.training and not model.ptk_prompts.training
    assert torch.equal(logits(model), logits(model))


def test_train_model_patching_turns_prompt_dropout_on():
    model = tm.make("bert").train()
    ptkernels.patch_model(model, PTuningV2Config(4, prefix_dropout=0.5), backend="eager")
    assert model.ptk_prompts.training
    assert not torch.equal(logits(model), logits(model))


def test_deepcopy_is_independent():
    model = patched("llama", PrefixTuningConfig(4))
    ref = logits(model)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin), ref)
    with torch.no_grad():
        twin.ptk_prompts.encoders["self"].prefix.add_(1.0)
    changed = logits(twin)
    assert not torch.equal(changed, ref)            # the copy uses its own prompts
    assert torch.equal(logits(model), ref)          # ... and the original is untouched
    ptkernels.unpatch_model(twin)
    assert get_state(model) is not None and torch.equal(logits(model), ref)
    assert not hasattr(twin, "ptk_prompts") and hasattr(model, "ptk_prompts")


def test_deepcopy_then_unpatch_original_keeps_copy_patched():
    model = patched("bert", PromptTuningConfig(3, gpc=GPCConfig()))
    twin = copy.deepcopy(model)
    ref = logits(twin)
    ptkernels.unpatch_model(model)
    assert torch.equal(logits(twin), ref)
    assert get_state(twin) is not None and get_state(model) is None


def test_deepcopy_of_patched_peft_model_is_independent():
    model = peft.get_peft_model(tm.make("gpt2"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    ptkernels.patch_model(model, backend="eager")
    batch = tm.batch("gpt2", pad="right")
    ref = logits(model, batch)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.prompt_encoder.default.embedding.weight.add_(1.0)
    assert not torch.equal(logits(twin, batch), ref)
    assert torch.equal(logits(model, batch), ref)
    ptkernels.unpatch_model(twin)
    assert torch.equal(logits(model, batch), ref) and "_ptkernels_peft" in model.__dict__


# ----------------------------------------------------------------------------------------------
# adapter files
# ----------------------------------------------------------------------------------------------

def _saved(tmp_path, model_type="llama", config=None):
    src = patched(model_type, config or PrefixTuningConfig(5))
    ptkernels.save_prompts(src, tmp_path)
    return src


def _edit_config(path, **changes):
    cfg = json.loads((path / adapters.CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / adapters.CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / adapters.WEIGHTS_NAME)
    fn(tensors)
    save_file(tensors, path / adapters.WEIGHTS_NAME)


def _truncate(path):
    data = (path / adapters.WEIGHTS_NAME).read_bytes()
    (path / adapters.WEIGHTS_NAME).write_bytes(data[:len(data) // 2])


BAD_FILES = [
    ("missing dir", lambda d: os.rename(d, str(d) + ".gone"), "missing"),
    ("corrupt json", lambda d: (d / adapters.CONFIG_NAME).write_text("{oops"), "cannot read"),
    ("json list", lambda d: (d / adapters.CONFIG_NAME).write_text("[1, 2]"), "expected a prompt-learning"),
    ("truncated weights", _truncate, "cannot read"),
    ("tokens", lambda d: _edit_config(d, num_virtual_tokens=6), "num_virtual_tokens=6"),
    ("peft type", lambda d: _edit_config(d, peft_type="PROMPT_TUNING"), "peft_type='PROMPT_TUNING'"),
    ("layers", lambda d: _edit_config(d, num_layers=3), "num_layers=3"),
    ("token dim", lambda d: _edit_config(d, token_dim=8), "token_dim=8"),
    ("emb shape", lambda d: _edit_tensors(d, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][:, :-1].contiguous())),
     "prompt_embeddings has shape"),
    ("no emb", lambda d: _edit_tensors(d, lambda t: t.update(other=t.pop("prompt_embeddings"))),
     "expected a prompt-learning"),
    ("nan", lambda d: _edit_tensors(d, lambda t: t["prompt_embeddings"].__setitem__((0, 0), float("nan"))),
     "NaN or infinite"),
    ("int dtype", lambda d: _edit_tensors(d, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"].long())),
     "expected floats"),
    ("base weight key", lambda d: _edit_tensors(d, lambda t: t.update(
        {"base_model.model.embed_tokens.weight": torch.zeros(tm.VOCAB, 32)})), "refusing to write"),
    ("unknown key", lambda d: _edit_tensors(d, lambda t: t.update({"evil": torch.zeros(2)})), "refusing to write"),
]


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """The files save_prompts writes for a llama prefix (written once for the module)."""
    path = tmp_path_factory.mktemp("adapter")
    _saved(path)
    return {n: (path / n).read_bytes() for n in os.listdir(path)}


@pytest.mark.parametrize("what,damage,match", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_adapter_changes_nothing(tmp_path, saved_files, what, damage, match):
    for name, data in saved_files.items():
        (tmp_path / name).write_bytes(data)
    damage(tmp_path)
    target = patched("llama", PrefixTuningConfig(5))
    snap, ref = snapshot(target), logits(target)
    with pytest.raises(ValueError, match=match):
        ptkernels.load_prompts(target, tmp_path)
    assert_unchanged(target, snap)
    assert torch.equal(logits(target), ref)


def test_head_adapter_cannot_write_frozen_weights(tmp_path):
    src = patched("bert", PTuningV2Config(4, prefix_dropout=0.0))
    ptkernels.save_prompts(src, tmp_path)
    _edit_tensors(tmp_path, lambda t: t.update(
        {"base_model.bert.pooler.dense.weight": torch.zeros(32, 32)}))
    target = patched("bert", PTuningV2Config(4, prefix_dropout=0.0))
    snap = snapshot(target)
    with pytest.raises(ValueError, match="refusing to write"):
        ptkernels.load_prompts(target, tmp_path)
    assert_unchanged(target, snap)


def test_mlp_module_refuses_instead_of_fitting(tmp_path):
    _saved(tmp_path)
    target = patched("llama", PrefixTuningConfig(5, projection_hidden_size=16))
    snap = snapshot(target)
    with pytest.raises(ValueError, match="MLP"):
        ptkernels.load_prompts(target, tmp_path)
    assert_unchanged(target, snap)


def test_round_trip_is_exact(tmp_path):
    src = _saved(tmp_path)
    dst = patched("llama", PrefixTuningConfig(5))
    ptkernels.load_prompts(dst, tmp_path)
    assert torch.equal(dst.ptk_prompts.encoders["self"].prefix, src.ptk_prompts.encoders["self"].prefix)
    assert sorted(os.listdir(tmp_path)) == [adapters.CONFIG_NAME, adapters.WEIGHTS_NAME]


@pytest.mark.parametrize("where", ["weights", "config", "rename"])
def test_failed_save_leaves_previous_adapter_loadable(tmp_path, monkeypatch, where):
    old = _saved(tmp_path)
    files = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    new = patched("llama", PrefixTuningConfig(5), seed=7)

    def boom(*a, **k):
        raise OSError("disk full")
    if where == "weights":
        monkeypatch.setattr("safetensors.torch.save", boom)
    elif where == "config":
        monkeypatch.setattr(adapters.json, "dumps", boom)
    else:
        monkeypatch.setattr(adapters.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ptkernels.save_prompts(new, tmp_path)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == files
    dst = patched("llama", PrefixTuningConfig(5))
    ptkernels.load_prompts(dst, tmp_path)
    assert torch.equal(dst.ptk_prompts.encoders["self"].prefix, old.ptk_prompts.encoders["self"].prefix)


def test_failed_peft_save_leaves_previous_adapter(tmp_path, monkeypatch):
    model = peft.get_peft_model(tm.make("gpt2"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    ptkernels.save_prompts(model, tmp_path)
    files = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.add_(1.0)
    real = adapters.os.replace
    calls = []

    def fail_second(src, dst):   # the first file lands, then the disk fails
        calls.append(dst)
        if len(calls) > 1:
            raise OSError("disk full")
        return real(src, dst)
    monkeypatch.setattr(adapters.os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"):
        ptkernels.save_prompts(model, tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(files)
    assert (tmp_path / adapters.CONFIG_NAME).read_bytes() == files[adapters.CONFIG_NAME]
    reloaded = peft.PeftModel.from_pretrained(tm.make("gpt2"), tmp_path)
    assert reloaded.prompt_encoder.default.embedding.weight.shape == (4, 2 * 2 * 32)


def test_bank_save_writes_the_ptkernels_adapter_only(tmp_path):
    """A bank has no PEFT form: the ptkernels pair is written, no PEFT pair claims to hold it."""
    model = patched("llama", PrefixTuningConfig(4, num_tasks=2))
    ptkernels.save_prompts(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["ptkernels_adapter.json",
                                                    "ptkernels_adapter.safetensors"]


# ----------------------------------------------------------------------------------------------
# threads and checkpointing (the long versions: test_integration_context.py)
# ----------------------------------------------------------------------------------------------

def test_threads_prompt_tuning_bank_equal_serial():
    model = patched("gpt2", PromptTuningConfig(3, num_tasks=2))
    batch = tm.batch("gpt2", pad="right")
    serial = [logits(model, task_ids=torch.full((3,), t)) for t in (0, 1)]
    errors, wrong = [], []

    def work(t):
        try:
            for _ in range(10):
                if not torch.equal(logits(model, task_ids=torch.full((3,), t)), serial[t]):
                    wrong.append(t)
        except BaseException as e:   # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and not wrong
    del batch


def test_recompute_without_context_is_an_error():
    """A layer recomputed in backward with no context (checkpointing applied around a layer by
    hand, bypassing transformers) raises instead of silently dropping the prefix."""
    from torch.utils.checkpoint import checkpoint
    model = patched("llama", PrefixTuningConfig(4))
    model.train()
    layer = model.model.layers[1]   # its input depends on layer 0's prefix: it is recomputed
    inner = type(layer).forward

    def by_hand(self, *args, **kwargs):
        from ptkernels.integrations.state import use_context
        with use_context(None):   # what a foreign checkpoint wrapper sees on recomputation
            return checkpoint(lambda *a: inner(self, *a, **kwargs), *args, use_reentrant=False)
    layer.forward = by_hand.__get__(layer)
    out = model(**tm.batch("llama", pad="right")).logits
    with pytest.raises(RuntimeError, match="without its forward's prefix context"):
        out.sum().backward()
