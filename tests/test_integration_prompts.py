"""patch_model(model, config): ptkernels' own prompt modules on a frozen model.

References: PEFT with the same prompt values (prefix tuning, prompt tuning), an eager Global
Prompt Cell loop written out layer by layer, single-task runs for mixed-task batches."""
import peft
import pytest
import torch

import method_references as mr
import peft_reference as pr
import ptkernels
import tiny_models as tm
from ptkernels.integrations import compat
from ptkernels.integrations import patch_model, unpatch_model
from ptkernels.integrations import prompt_attach
from ptkernels.integrations import transformers as tfi
from ptkernels.prompts import kv_to_peft

TASK_TYPE = tm.PEFT_TASK_TYPE


def _real_rows(logits, batch, task, extra=0):
    if task != "causal_lm":
        return logits
    mask = batch["attention_mask"].bool()
    return logits[torch.cat([torch.ones(mask.shape[0], extra, dtype=torch.bool), mask], 1)]


@pytest.mark.parametrize("model_type,pad", [("llama", "left"), ("gpt2", "right"), ("opt", "left"),
                                            ("bert", "right"), ("roberta", "left"),
                                            ("qwen3", "right"), ("bart", "right")])
def test_prefix_config_matches_peft(model_type, pad):
    task = tm.default_task(model_type)
    site = "decoder" if model_type in tm.SEQ2SEQ else "self"
    ours = tm.make(model_type)
    cfg = ptkernels.PrefixTuningConfig(num_virtual_tokens=5,
                                       sites=[site] if site != "self" else None)
    patch_model(ours, cfg, backend="eager")
    # the prefix trains; a classification model's new head trains with it (as PEFT's SEQ_CLS)
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    heads = sorted(n for n, _ in ours.named_parameters() if n.startswith("classifier."))
    assert trainable == sorted([f"ptk_prompts.encoders.{site}.prefix"] + heads)
    assert bool(heads) == (task == "seq_cls")
    ref = peft.get_peft_model(tm.make(model_type), peft.PrefixTuningConfig(
        task_type=TASK_TYPE[task], num_virtual_tokens=5))
    flat = ours.ptk_prompts.to_peft_embeddings(site)
    if site == "decoder":   # PEFT's seq2seq layout: decoder layer i reads PEFT layer (2i mod L)
        prefix = ours.ptk_prompts.encoders[site].prefix
        layers = prefix.shape[0]
        with torch.no_grad():
            prefix.copy_(prefix[[(2 * i) % layers for i in range(layers)]].clone())
        flat = ours.ptk_prompts.to_peft_embeddings(site)
    with torch.no_grad():
        ref.prompt_encoder.default.embedding.weight.copy_(flat)
    batch = tm.labelled_batch(model_type, task, pad=pad)
    out_ref = pr.reference_forward(ref, **batch)   # PEFT's parameters, independent forward
    out = ours(**batch)
    torch.testing.assert_close(_real_rows(out.logits, batch, task),
                               _real_rows(out_ref.logits, batch, task), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    if site == "self":
        g = kv_to_peft(ours.ptk_prompts.encoders[site].prefix.grad[:, :, 0])
        torch.testing.assert_close(g, ref.prompt_encoder.default.embedding.weight.grad,
                                   atol=1e-5, rtol=1e-4)
    expected = _real_rows(out_ref.logits, batch, task).detach()
    pr.check_upstream(lambda: _real_rows(ref(**batch).logits, batch, task).detach(),
                      pr.tensors_agree(expected), "prefix-tuning forward")


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_prompt_tuning_config_matches_peft(model_type):
    task = tm.default_task(model_type)
    ours = tm.make(model_type)
    patch_model(ours, ptkernels.PromptTuningConfig(num_virtual_tokens=4), backend="eager")
    ref = peft.get_peft_model(tm.make(model_type), peft.PromptTuningConfig(
        task_type=TASK_TYPE[task], num_virtual_tokens=4))
    with torch.no_grad():
        ref.prompt_encoder.default.embedding.weight.copy_(ours.ptk_prompts.prompts[0])
    batch = tm.labelled_batch(model_type, task, pad="left")
    out, out_ref = ours(**batch), pr.reference_forward(ref, **batch)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    grad = ref.prompt_encoder.default.embedding.weight.grad.clone()
    torch.testing.assert_close(ours.ptk_prompts.prompts.grad[0], grad, atol=1e-5, rtol=1e-4)
    expected = out_ref.logits.detach()
    pr.check_upstream(lambda: ref(**batch).logits.detach(), pr.tensors_agree(expected),
                      "prompt-tuning forward")


def test_gpc_matches_layer_by_layer_reference():
    model = tm.make("bert")
    patch_model(model, ptkernels.PromptTuningConfig(num_virtual_tokens=3, gpc=ptkernels.GPCConfig()),
                backend="eager")
    mod = model.ptk_prompts
    with torch.no_grad():   # a gate that actually mixes
        mod.gpc.weight.normal_(0, 0.2)
    batch = tm.batch("bert", pad="right")
    got = model(**batch).logits

    ref_model = tm.make("bert")
    b, m = batch["input_ids"].shape[0], 3
    prompts = mod.prompts[0].expand(b, -1, -1)
    embeds = ref_model.bert.embeddings.word_embeddings(batch["input_ids"])
    h = ref_model.bert.embeddings(inputs_embeds=torch.cat([prompts, embeds], 1))
    mask = torch.cat([torch.ones(b, m, dtype=torch.long), batch["attention_mask"]], 1)
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    state = prompts
    w, bias = mod.gpc.weight, mod.gpc.bias
    d = h.shape[-1]
    for layer in ref_model.bert.encoder.layer:
        out = layer(h, attention_mask=ext)
        h = out[0] if isinstance(out, tuple) else out
        u = h[:, :m]
        a = torch.cat([u, state], -1) @ w + bias
        state = torch.sigmoid(a[..., :d]) * state + torch.sigmoid(a[..., d:]) * u
        h = torch.cat([state, h[:, m:]], 1)
    pooled = ref_model.bert.pooler(h)
    ref = ref_model.classifier(pooled)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    unpatch_model(model)
    assert not any(layer._forward_hooks for layer in model.bert.encoder.layer)
    assert not hasattr(model, "ptk_prompts")


def test_task_bank_rows_equal_single_task_runs():
    model = tm.make("llama")
    patch_model(model, ptkernels.PrefixTuningConfig(num_virtual_tokens=4, num_tasks=3),
                backend="eager")
    batch = tm.batch("llama", pad="right")
    task_ids = torch.tensor([2, 0, 2])
    mixed = model(**batch, task_ids=task_ids).logits
    for t in range(3):
        rows = (task_ids == t).nonzero().flatten()
        if len(rows):
            one = model(**batch, task_ids=torch.full((3,), t)).logits
            torch.testing.assert_close(mixed[rows], one[rows], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="task_ids"):
        model(**batch)


def test_p_tuning_v2_keeps_head_trainable_and_unpatch_restores():
    model = tm.make("bert")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    impl = model.config._attn_implementation
    patch_model(model, ptkernels.PTuningV2Config(num_virtual_tokens=4, prefix_dropout=0.0),
                backend="eager")
    train = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert train == ["classifier.bias", "classifier.weight", "ptk_prompts.encoders.self.prefix"]
    unpatch_model(model)
    assert not hasattr(model, "ptk_prompts") and "forward" not in model.__dict__
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.config._attn_implementation == impl


def test_words_init_uses_captured_kv():
    model = tm.make("gpt2")
    ids = [5, 9, 11]
    patch_model(model, ptkernels.PrefixTuningConfig(num_virtual_tokens=3, init="words",
                                                    init_token_ids=ids), backend="eager")
    state = tfi.get_state(model)
    k, v = prompt_attach.capture_kv(model, state, torch.tensor(ids))["self"]
    prefix = model.ptk_prompts.encoders["self"].raw()
    torch.testing.assert_close(prefix[:, 0, 0], k)
    torch.testing.assert_close(prefix[:, 1, 0], v)


def test_bad_config_leaves_model_untouched():
    model = tm.make("llama")
    with pytest.raises(ValueError, match="sites"):
        patch_model(model, ptkernels.PrefixTuningConfig(num_virtual_tokens=4, sites=["cross"]))
    assert tfi.get_state(model) is None and not hasattr(model, "ptk_prompts")
    assert model.config._attn_implementation == "eager"
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="positions"):
        patch_model(tm.make("gpt2"), ptkernels.PrefixTuningConfig(num_virtual_tokens=200))


def _deberta_eager_prefix(pk, pv):
    """P-Tuning v2's DeBERTa prefix as plain math: prefix keys get content scores only."""
    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        b, n, _ = hidden_states.shape
        heads, layer = self.num_attention_heads, self._ref_layer
        q = self.transpose_for_scores(self.query_proj(hidden_states), heads)
        k = self.transpose_for_scores(self.key_proj(hidden_states), heads)
        v = self.transpose_for_scores(self.value_proj(hidden_states), heads)
        d, p = q.shape[-1], pk.shape[-2]
        scale = (d * 3) ** 0.5
        rel = self.disentangled_attention_bias(q, k, relative_pos, rel_embeddings, 3)
        pkl = pk[layer].expand(b, -1, -1, -1).reshape(b * heads, p, d)
        pvl = pv[layer].expand(b, -1, -1, -1).reshape(b * heads, p, d)
        scores = torch.cat([q @ pkl.transpose(1, 2) / scale, q @ k.transpose(1, 2) / scale + rel], -1)
        keys = torch.cat([torch.ones(b, p, dtype=torch.bool),
                          torch.diagonal(attention_mask[:, 0], dim1=-2, dim2=-1).bool()], 1)
        scores = scores.view(b, heads, n, p + n).masked_fill(~keys[:, None, None, :], -1e30)
        probs = scores.softmax(-1).view(b * heads, n, p + n)
        out = probs @ torch.cat([pvl, v], 1)
        return out.view(b, heads, n, d).permute(0, 2, 1, 3).reshape(b, n, heads * d), None
    return forward


def test_deberta_prefix_matches_eager_method(monkeypatch):
    ours = tm.make("deberta-v2")
    patch_model(ours, ptkernels.PTuningV2Config(num_virtual_tokens=4, prefix_dropout=0.0),
                backend="eager")
    prefix = ours.ptk_prompts.encoders["self"].prefix                   # (L, 2, 1, H, P, D)
    pk = prefix[:, 0, 0].detach().clone().requires_grad_()
    pv = prefix[:, 1, 0].detach().clone().requires_grad_()
    ref = tm.make("deberta-v2")
    for i, layer in enumerate(ref.deberta.encoder.layer):
        layer.attention.self._ref_layer = i
    cls = type(ref.deberta.encoder.layer[0].attention.self)
    monkeypatch.setattr(cls, "forward", _deberta_eager_prefix(pk, pv))
    batch = tm.batch("deberta-v2", pad="right")
    batch["labels"] = torch.tensor([0, 2, 1])
    out, out_ref = ours(**batch), ref(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    torch.testing.assert_close(prefix.grad[:, 0, 0], pk.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prefix.grad[:, 1, 0], pv.grad, atol=1e-5, rtol=1e-4)


def test_prefix_config_generate_matches_peft():
    ours = tm.make("llama")
    patch_model(ours, ptkernels.PrefixTuningConfig(num_virtual_tokens=5), backend="eager")
    ref = peft.get_peft_model(tm.make("llama"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        ref.prompt_encoder.default.embedding.weight.copy_(ours.ptk_prompts.to_peft_embeddings("self"))
    batch = tm.batch("llama", pad="left")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    seq, scores = pr.greedy_no_cache(lambda **inputs: pr.reference_forward(ref, **inputs),
                                     ref.get_base_model(), batch, 4)
    o = ours.generate(**batch, **kw)
    assert torch.equal(o.sequences, seq)
    for a, b in zip(scores, o.scores):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    pr.check_upstream(lambda: ref.generate(**batch, **kw).sequences,
                      lambda s: torch.equal(s, seq), "generate with prefix tuning")


@pytest.mark.parametrize("model_type", tm.DECODERS)
def test_config_cached_step_without_position_ids_equals_recompute(model_type):
    """patch_model(model, config): a cached decode step without position_ids == full recompute
    == the independent reference (real tokens at P..P+n-1 whatever the cache argument's name)."""
    model = tm.make(model_type)
    patch_model(model, ptkernels.PrefixTuningConfig(num_virtual_tokens=5), backend="eager")
    ids = tm.batch(model_type, pad="none")["input_ids"]
    arg = compat.cache_arg_name(model.forward)
    k, v = model.ptk_prompts.prefix_kv()["self"]
    with torch.no_grad():
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], use_cache=True, **{arg: compat.output_cache(first)})
        full = model(input_ids=ids)
        unpatch_model(model)
        ref = mr.prefix_forward(model, (k[:, 0], v[:, 0]), input_ids=ids)
    torch.testing.assert_close(full.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_bart_positions_with_prefixes_on_all_sites():
    """BART-family learned positions: with prefixes on every site, encoder and decoder tokens sit
    at P..P+n-1 (cached decoder steps included), under any name the release gives the argument."""
    model = tm.make("bart")
    p = 3
    patch_model(model, ptkernels.PrefixTuningConfig(num_virtual_tokens=p,
                                                    sites=["encoder", "decoder", "cross"]),
                backend="eager")
    seen = {}

    def spy(name):
        def hook(module, args, output):
            seen[name] = output.detach()
        return hook
    stacks = {"encoder": model.get_encoder(), "decoder": model.get_decoder()}
    handles = [stack.embed_positions.register_forward_hook(spy(name))
               for name, stack in stacks.items()]
    batch = tm.batch("bart", pad="none")
    n, m = batch["input_ids"].shape[1], batch["decoder_input_ids"].shape[1]

    def expected(name, start, length):
        emb = stacks[name].embed_positions
        return emb.weight[torch.arange(start, start + length) + emb.offset]
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            torch.testing.assert_close(seen["encoder"].reshape(-1, n, seen["encoder"].shape[-1])[0],
                                       expected("encoder", p, n))
            torch.testing.assert_close(seen["decoder"].reshape(-1, m, seen["decoder"].shape[-1])[0],
                                       expected("decoder", p, m))
            arg = compat.cache_arg_name(model.forward)
            nxt = torch.full((batch["input_ids"].shape[0], 1), 5)
            model(input_ids=batch["input_ids"], decoder_input_ids=nxt, use_cache=True,
                  encoder_outputs=(out.encoder_last_hidden_state,),
                  **{arg: compat.output_cache(out)})
            torch.testing.assert_close(seen["decoder"].reshape(-1, 1, seen["decoder"].shape[-1])[0],
                                       expected("decoder", p + m, 1))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_prefix_gradients_with_activation_checkpointing(model_type):
    def prefix_grad(checkpointing):
        model = tm.make(model_type)
        patch_model(model, ptkernels.PrefixTuningConfig(num_virtual_tokens=4), backend="eager")
        model.train()
        if checkpointing:   # recomputation runs in backward, after the forward's context ended
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**tm.batch(model_type, pad="right")).logits.square().mean().backward()
        return model.ptk_prompts.encoders["self"].prefix.grad
    torch.testing.assert_close(prefix_grad(True), prefix_grad(False), atol=1e-7, rtol=1e-4)


def test_position_offset_false_keeps_positions():
    ours = tm.make("llama")
    patch_model(ours, ptkernels.PrefixTuningConfig(num_virtual_tokens=5, position_offset=False),
                backend="eager")
    ref = peft.get_peft_model(tm.make("llama"), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        ref.prompt_encoder.default.embedding.weight.copy_(ours.ptk_prompts.to_peft_embeddings("self"))
    batch = tm.batch("llama", pad="right")
    n = batch["input_ids"].shape[1]
    # PEFT adds P to given position_ids: arange(n) - P puts its real tokens at 0..n-1
    shifted = (torch.arange(n) - 5).unsqueeze(0).expand(3, -1)
    with torch.no_grad():
        # the independent reference with real tokens at 0..n-1 (its position_ids get +P)
        expected = pr.reference_forward(ref, **batch, position_ids=shifted).logits
        torch.testing.assert_close(ours(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        assert (ours(**batch).logits - pr.reference_forward(ref, **batch).logits).abs().max() > 1e-3
        pr.check_upstream(lambda: ref(**batch, position_ids=shifted).logits,
                          pr.tensors_agree(expected), "forward with shifted position_ids")


def test_attention_dropout_active_in_training_only():
    model = tm.make("bert", attention_probs_dropout_prob=0.5)   # the only dropout in the model
    patch_model(model, ptkernels.PTuningV2Config(num_virtual_tokens=4, prefix_dropout=0.0),
                backend="eager")
    batch = tm.batch("bert", pad="right")
    with torch.no_grad():
        model.eval()
        a, b = model(**batch).logits, model(**batch).logits
        assert torch.equal(a, b)
        model.train()
        c, d = model(**batch).logits, model(**batch).logits
        assert not torch.equal(c, d)
