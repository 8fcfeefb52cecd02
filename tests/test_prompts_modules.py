"""The prompt modules alone, on hand-built ModelSpecs (no transformers model): shapes, MLP vs no
MLP, merge, banks, init modes, dropout, PEFT layout, errors, parameter report."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ptkernels
from ptkernels.prompts import (GPCConfig, ModelSpec, PrefixTuningConfig, PromptTuningConfig, PTuningV2Config,
                               SiteSpec, build_prompt_module, extract_task, kv_to_peft, parameter_report,
                               peft_to_kv, select_prompts, trainable_head_names)

HIDDEN, VOCAB = 24, 50


def make_spec(encoder_decoder=False, max_positions=64, dtype=torch.float32, hkv=2, d=6, layers=3):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02
    wk = torch.randn(HIDDEN, hkv * d, generator=gen, dtype=torch.float64)

    names = ("encoder", "decoder", "cross") if encoder_decoder else ("self",)
    sites = {n: SiteSpec(n, layers + i, hkv, d) for i, n in enumerate(names)}

    def capture_kv(ids):  # a deterministic stand-in for the frozen model's K/V of real words
        x = table[ids].double()
        out = {}
        for n, s in sites.items():
            k = torch.stack([(x * (l + 1)) @ wk for l in range(s.num_layers)])      # (L, n, Hkv*D)
            k = k.view(s.num_layers, -1, hkv, d).transpose(1, 2)
            out[n] = (k.to(dtype), (-k).to(dtype))
        return out

    return ModelSpec(model_type="toy", hidden_size=HIDDEN, vocab_size=VOCAB, is_encoder_decoder=encoder_decoder,
                     sites=sites, max_positions=max_positions, dtype=dtype, device=torch.device("cpu"),
                     embed_tokens=lambda ids: table[ids].to(dtype), capture_kv=capture_kv)


def test_configs_exported_at_top_level():
    assert ptkernels.PrefixTuningConfig is PrefixTuningConfig
    assert ptkernels.GPCConfig is GPCConfig and ptkernels.PTuningV2Config is PTuningV2Config
    assert ptkernels.PromptTuningConfig is PromptTuningConfig


@pytest.mark.parametrize("proj", [None, True, 16])
@pytest.mark.parametrize("tasks", [1, 3])
def test_prefix_shapes_dtype_and_views(proj, tasks):
    spec = make_spec(dtype=torch.float16)
    mod = build_prompt_module(PrefixTuningConfig(5, projection_hidden_size=proj, num_tasks=tasks), spec)
    assert mod.kind == "prefix" and mod.sites == ("self",) and mod.gpc is None
    k, v = mod.prefix_kv()["self"]
    assert k.shape == v.shape == (3, tasks, 2, 5, 6) and k.dtype == torch.float16
    assert not torch.equal(k, v)
    if proj is None:
        assert mod.encoders["self"].prefix.shape == (3, 2, tasks, 2, 5, 6)
    else:
        hid = 512 if proj is True else proj
        assert mod.encoders["self"].mlp[0].out_features == hid
    # gradients reach every trainable parameter
    (k.float().square().sum() + v.float().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())


def test_encoder_decoder_sites_and_errors():
    spec = make_spec(encoder_decoder=True)
    mod = build_prompt_module(PrefixTuningConfig(4), spec)
    kv = mod.prefix_kv()
    assert set(kv) == {"encoder", "decoder", "cross"}
    assert kv["encoder"][0].shape[0] == 3 and kv["decoder"][0].shape[0] == 4 and kv["cross"][0].shape[0] == 5
    only = build_prompt_module(PrefixTuningConfig(4, sites=["cross", "decoder"]), spec)
    assert only.sites == ("decoder", "cross")
    with pytest.raises(ValueError, match="cross"):
        build_prompt_module(PrefixTuningConfig(4, sites=["cross"]), make_spec())
    with pytest.raises(ValueError, match="sites"):
        PrefixTuningConfig(4, sites=["attention"])


@pytest.mark.parametrize("make", [
    lambda: PrefixTuningConfig(0), lambda: PTuningV2Config(-1), lambda: PromptTuningConfig(0),
    lambda: PrefixTuningConfig(4, num_tasks=0), lambda: PromptTuningConfig(4, num_tasks=0),
    lambda: GPCConfig(variant="rnn"), lambda: PrefixTuningConfig(4, init="ones"),
    lambda: PrefixTuningConfig(4, prefix_dropout=1.0), lambda: PrefixTuningConfig(4, projection_hidden_size=-3),
    lambda: PrefixTuningConfig(3, init="words", init_token_ids=[1, 2]),
    lambda: PrefixTuningConfig(3, init="words"), lambda: PromptTuningConfig(3, init_token_ids=[1]),
], ids=["p0", "v2neg", "pt0", "tasks0", "pt-tasks0", "variant", "init", "dropout", "proj", "words-len",
        "words-ids", "ids-without-words"])
def test_bad_configs_raise(make):
    with pytest.raises((ValueError, TypeError)):
        make()


def test_prompt_longer_than_positions_raises():
    spec = make_spec(max_positions=8)
    for cfg in (PrefixTuningConfig(8), PTuningV2Config(9), PromptTuningConfig(8)):
        with pytest.raises(ValueError, match="positions"):
            build_prompt_module(cfg, spec)
    build_prompt_module(PrefixTuningConfig(8, position_offset=False), spec)   # no shift: fits
    build_prompt_module(PrefixTuningConfig(7), spec)
    build_prompt_module(PrefixTuningConfig(100), make_spec(max_positions=None))  # RoPE: unbounded


@pytest.mark.parametrize("tasks", [1, 2])
def test_merge_keeps_outputs(tasks):
    torch.manual_seed(1)
    mod = build_prompt_module(PrefixTuningConfig(4, projection_hidden_size=8, num_tasks=tasks, prefix_dropout=0.3),
                              make_spec(encoder_decoder=True, dtype=torch.float64))
    mod.eval()
    before = {s: (k.clone(), v.clone()) for s, (k, v) in mod.prefix_kv().items()}
    n_before = sum(p.numel() for p in mod.parameters())
    mod.merge()
    after = mod.prefix_kv()
    for s in before:
        torch.testing.assert_close(after[s][0], before[s][0], rtol=0, atol=0)
        torch.testing.assert_close(after[s][1], before[s][1], rtol=0, atol=0)
        assert not mod.encoders[s].has_mlp
    assert sum(p.numel() for p in mod.parameters()) == mod.stored_parameters() < n_before
    assert set(dict(mod.named_parameters())) == {f"encoders.{s}.prefix" for s in before}


def test_dropout_only_in_training():
    torch.manual_seed(2)
    mod = build_prompt_module(PTuningV2Config(6), make_spec())
    assert mod.encoders["self"].dropout.p == 0.1
    mod.eval()
    k1, _ = mod.prefix_kv()["self"]
    k2, _ = mod.prefix_kv()["self"]
    assert torch.equal(k1, k2) and torch.equal(k1, mod.encoders["self"].prefix[:, 0])
    mod.train()
    k3, _ = mod.prefix_kv()["self"]
    zeros = (k3 == 0).float().mean().item()
    assert 0.02 < zeros < 0.25
    kept = k3 != 0
    torch.testing.assert_close(k3[kept], (k1 / 0.9)[kept])
    plain = build_prompt_module(PrefixTuningConfig(6), make_spec()).train()   # prefix-tuning default: 0.0
    assert torch.equal(plain.prefix_kv()["self"][0], plain.encoders["self"].prefix[:, 0])


@pytest.mark.parametrize("proj", [None, 32])
@pytest.mark.parametrize("tasks", [1, 2])
def test_init_words_uses_captured_kv(proj, tasks):
    spec = make_spec(encoder_decoder=True, dtype=torch.float64)
    ids = [3, 7, 11, 7]
    mod = build_prompt_module(PrefixTuningConfig(4, init="words", init_token_ids=ids, projection_hidden_size=proj,
                                                 num_tasks=tasks), spec).eval()
    captured = spec.capture_kv(torch.tensor(ids))
    for site, (k, v) in mod.prefix_kv().items():
        for t in range(tasks):
            torch.testing.assert_close(k[:, t], captured[site][0], rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(v[:, t], captured[site][1], rtol=1e-7, atol=1e-9)
    spec.capture_kv = None
    with pytest.raises(ValueError, match="capture_kv"):
        build_prompt_module(PrefixTuningConfig(4, init="words", init_token_ids=ids), spec)


def test_init_zero():
    for proj in (None, 8):
        k, v = build_prompt_module(PrefixTuningConfig(3, init="zero", projection_hidden_size=proj),
                                   make_spec()).prefix_kv()["self"]
        assert k.abs().sum() == 0 and v.abs().sum() == 0


def test_peft_layout_round_trip():
    torch.manual_seed(3)
    spec = make_spec(hkv=3, d=4, layers=2)
    mod = build_prompt_module(PrefixTuningConfig(5, num_tasks=2), spec)
    enc = mod.encoders["self"]
    emb = mod.to_peft_embeddings("self", task=1)
    assert emb.shape == (5, 2 * 2 * 3 * 4)
    # PEFT's decode rule: E.view(P, 2L, H, D).permute(1, 2, 0, 3) -> row 2l = K of layer l, 2l+1 = V
    dec = emb.view(5, 4, 3, 4).permute(1, 2, 0, 3)
    k, v = mod.prefix_kv()["self"]
    torch.testing.assert_close(dec[0::2], k[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(dec[1::2], v[:, 1], rtol=0, atol=0)
    assert torch.equal(kv_to_peft(peft_to_kv(emb, 2, 3, 4)), emb)
    other = build_prompt_module(PrefixTuningConfig(5, projection_hidden_size=64), spec).double()
    other.encoders["self"].mlp.double()
    other.from_peft_embeddings("self", emb.double())
    torch.testing.assert_close(other.to_peft_embeddings("self").float(), emb, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt_embeddings"):
        enc.from_peft_embeddings(torch.zeros(5, 7))


def test_prefix_bank_rows_match_single_task_modules():
    torch.manual_seed(4)
    spec = make_spec()
    bank = build_prompt_module(PrefixTuningConfig(3, num_tasks=3, projection_hidden_size=12), spec).eval()
    single = build_prompt_module(PrefixTuningConfig(3), spec).eval()
    extract_task(bank, single, 2)
    torch.testing.assert_close(single.prefix_kv()["self"][0][:, 0], bank.prefix_kv()["self"][0][:, 2])
    torch.testing.assert_close(single.prefix_kv()["self"][1][:, 0], bank.prefix_kv()["self"][1][:, 2])


@pytest.mark.parametrize("init", ["random", "vocab", "words"])
def test_prompt_tuning_init_and_bank(init):
    torch.manual_seed(5)
    spec = make_spec(dtype=torch.bfloat16)
    ids = [4, 9] if init == "words" else None
    mod = build_prompt_module(PromptTuningConfig(5, init=init, init_token_ids=ids, num_tasks=2), spec)
    assert mod.kind == "input" and mod.gpc is None and mod.num_tasks == 2
    p = mod.input_prompts()
    assert p.shape == (2, 5, HIDDEN) and p.dtype == torch.bfloat16 and mod.prompts.dtype == torch.float32
    if init == "words":  # PEFT's TEXT init: ids cycled to fill the prompt
        expected = spec.embed_tokens(torch.tensor([4, 9, 4, 9, 4])).float()
        torch.testing.assert_close(mod.prompts[1], expected)
    elif init == "random":  # scaled to the vocabulary embeddings' RMS (0.02 here), not N(0, 1)
        assert 0.005 < mod.prompts.std().item() < 0.08
    rows = select_prompts(p, torch.tensor([1, 0, 1]), 3)
    assert torch.equal(rows[0], p[1]) and torch.equal(rows[1], p[0])
    with pytest.raises(ValueError, match="task_ids"):
        select_prompts(p, None, 3)
    with pytest.raises(ValueError, match="task_ids"):
        select_prompts(p, torch.tensor([0, 2, 1]), 3)
    with pytest.raises(ValueError, match="vocab_size"):
        build_prompt_module(PromptTuningConfig(3, init="words", init_token_ids=[VOCAB]), spec)


@pytest.mark.parametrize("variant", ["lstm", "candidate", "gru", "reinject"])
def test_gpc_module(variant):
    torch.manual_seed(6)
    spec = make_spec(dtype=torch.float64)
    mod = build_prompt_module(PromptTuningConfig(4, gpc=GPCConfig(variant=variant, forget_bias=2.0)), spec)
    gpc = mod.gpc
    d = HIDDEN
    assert gpc.weight.shape == (2 * d, {"lstm": 2, "candidate": 3, "gru": 1, "reinject": 2}[variant] * d)
    memory_gate = {"lstm": gpc.bias[:d], "candidate": gpc.bias[:d], "reinject": gpc.bias[d:],
                   "gru": -gpc.bias}[variant]
    assert torch.all(memory_gate == 2.0)
    p0 = mod.input_prompts().expand(3, -1, -1).contiguous()
    s = gpc.initial_state(p0)
    u1, u2 = torch.randn(2, 3, 4, d, dtype=torch.float64)
    s1 = gpc(u1, s)
    s2 = gpc(u2, s1)
    from ptkernels.backends.eager_gpc import reference_gpc_cell
    ref1 = reference_gpc_cell(u1, p0, gpc.weight, gpc.bias, variant)
    ref2 = reference_gpc_cell(u2, p0 if variant == "reinject" else ref1, gpc.weight, gpc.bias, variant)
    torch.testing.assert_close(s1, ref1)
    torch.testing.assert_close(s2, ref2)
    s2.sum().backward()
    assert gpc.weight.grad is not None and mod.prompts.grad is not None


def test_parameter_report():
    spec = make_spec()
    base = nn.Linear(100, 100)            # 10,100 parameters
    head = nn.Linear(HIDDEN, 2)           # 50
    mlp = build_prompt_module(PTuningV2Config(4, projection_hidden_size=8), spec)
    r = parameter_report(mlp, base, head)
    stored = 3 * 2 * 2 * 4 * 6
    assert r.stored_parameters == stored and r.head_parameters == 50 and r.base_parameters == 10100
    assert r.prompt_parameters == sum(p.numel() for p in mlp.parameters()) > stored
    assert r.trainable == r.prompt_parameters + 50
    assert abs(r.trainable_share - r.trainable / (10100 + r.prompt_parameters)) < 1e-12
    text = str(r)
    assert "p_tuning_v2" in text and f"{r.trainable:,}" in text and "%" in text
    gpc = build_prompt_module(PromptTuningConfig(4, gpc=GPCConfig()), spec)
    r2 = parameter_report(gpc, 10100)
    assert r2.stored_parameters == r2.prompt_parameters == 4 * HIDDEN + 2 * HIDDEN * 2 * HIDDEN + 2 * HIDDEN


def test_trainable_head_names():
    class BertForSequenceClassification(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert, self.dropout, self.classifier = nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 2)

    class LlamaForTokenClassification(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.score = nn.Linear(2, 2), nn.Linear(2, 2)

    class GPT2LMHeadModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(2, 2)

    assert trainable_head_names(BertForSequenceClassification()) == ["classifier"]
    assert trainable_head_names(LlamaForTokenClassification()) == ["score"]
    assert trainable_head_names(GPT2LMHeadModel()) == []
