"""PEFT as one more implementation, not the truth: an independent reference for PEFT prompt-learning
models, and the rule for reporting PEFT's own failures as upstream.

A PEFT model's prompts are read from PEFT's parameters (its prompt encoder, exactly as
``PeftModel.get_prompt`` evaluates it) and decoded with PEFT's documented layout
(``reference/ecosystem.md`` 2.3, 2.6) by code written here; the forward then runs the *unpatched*
transformers model through ``method_references`` (prefix as a fresh cache, prompts as input
embeddings). Nothing here imports ptkernels.

``check_upstream`` runs PEFT's own forward/generate after ptkernels has been checked against the
independent reference: when PEFT raises or disagrees with the reference for this transformers/PEFT
pair, the test is marked xfail with the reason (an upstream failure), never skipped, and the
ptkernels assertions have already run.
"""
from __future__ import annotations

import inspect
from typing import Callable

import peft
import pytest
import torch
import transformers

import method_references as mr

VERSIONS = f"PEFT {peft.__version__} on transformers {transformers.__version__}"


def _kind(peft_model) -> str:
    cfg = peft_model.active_peft_config
    return str(getattr(cfg.peft_type, "value", cfg.peft_type))


def prompt_encoder_output(peft_model) -> torch.Tensor:
    """PEFT's prompt-encoder output for one row, as ``get_prompt`` evaluates it: (P, width)."""
    cfg = peft_model.active_peft_config
    adapter = peft_model.active_adapter
    encoder = peft_model.prompt_encoder[adapter]
    if _kind(peft_model) == "PREFIX_TUNING":
        if cfg.inference_mode:
            return encoder.embedding.weight
        p = cfg.num_virtual_tokens
    else:
        p = cfg.num_virtual_tokens * cfg.num_transformer_submodules
    tokens = peft_model.prompt_tokens[adapter][:p].unsqueeze(0)
    return encoder(tokens.to(next(encoder.parameters()).device))[0]


def peft_prefix(peft_model) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT prefix tuning's self-attention (or decoder self-attention) prefix: K, V (L, H, P, D).

    Layout: ``E.view(P, 2L, H, D)``, rows 2i / 2i+1 = layer i's K / V. Seq2seq models: PEFT
    concatenates the rows with themselves and splits in fours, so decoder layer i reads rows
    4i, 4i+1 (mod 2L) (its cross-attention rows are discarded)."""
    cfg = peft_model.active_peft_config
    flat = prompt_encoder_output(peft_model)
    layers, heads = cfg.num_layers, cfg.num_attention_heads
    p = flat.shape[0]
    x = flat.view(p, 2 * layers, heads, cfg.token_dim // heads).permute(1, 2, 0, 3)
    if cfg.num_transformer_submodules == 2:
        x = torch.cat([x, x], 0)
        return x[0::4][:layers], x[1::4][:layers]
    return x[0::2], x[1::2]


def reference_forward(peft_model, **inputs):
    """The independent reference of ``peft_model(**inputs)`` (unpatched base model)."""
    base = peft_model.get_base_model()
    kind = _kind(peft_model)
    if kind == "PREFIX_TUNING":
        return mr.prefix_forward(base, peft_prefix(peft_model), **inputs)
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        prompts = prompt_encoder_output(peft_model).unsqueeze(0)
        task = peft_model.active_peft_config.task_type
        return mr.prompt_forward(base, prompts, causal_lm=str(task).endswith("CAUSAL_LM"), **inputs)
    raise ValueError(kind)


def greedy_no_cache(forward: Callable, model, batch: dict, steps: int):
    """Greedy decoding by full recomputation at every step (no cache of real tokens).

    ``forward(**inputs)`` -> output with ``.logits``. Follows ``generate``'s conventions: decoder-only
    models get ``position_ids = cumsum(mask) - 1`` (0 on padding) when their forward accepts them;
    encoder-decoders start from ``decoder_start_token_id``; rows that produced EOS continue with
    the pad token; decoding stops when every row is done. Returns (sequences, [scores per step])."""
    cfg = model.generation_config
    eos, pad = cfg.eos_token_id, cfg.pad_token_id if cfg.pad_token_id is not None else 0
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0]
    seq2seq = model.config.is_encoder_decoder
    if seq2seq:
        start = model.config.decoder_start_token_id
        out = torch.full((b, 1), start, dtype=torch.long)
    else:
        out = ids
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    done = torch.zeros(b, dtype=torch.bool)
    scores = []
    with torch.no_grad():
        for _ in range(steps):
            if seq2seq:
                logits = forward(input_ids=ids, attention_mask=mask, decoder_input_ids=out).logits
            else:
                kw = {}
                if takes_positions:
                    kw["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
                logits = forward(input_ids=out, attention_mask=mask, **kw).logits
            last = logits[:, -1].float()
            scores.append(last)
            nxt = torch.where(done, torch.full_like(last[:, 0], pad, dtype=torch.long),
                              last.argmax(-1))
            done = done | torch.isin(nxt, torch.tensor(sorted(eos), dtype=torch.long))
            out = torch.cat([out, nxt[:, None]], 1)
            if not seq2seq:
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
            if bool(done.all()):
                break
    return out, scores


def _close(a, b, atol, rtol) -> bool:
    try:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
        return True
    except AssertionError:
        return False


def check_upstream(run_peft: Callable, agrees: Callable[[object], bool], what: str):
    """Run PEFT (``run_peft()``) and check it with ``agrees(result)`` against the independent
    reference. A PEFT error or disagreement marks the test xfail as an upstream failure. Call this
    only after every ptkernels assertion of the test has passed."""
    try:
        result = run_peft()
    except Exception as e:  # noqa: BLE001 - any PEFT failure is reported, with its message
        pytest.xfail(f"upstream: {VERSIONS}: PEFT {what} raises {type(e).__name__}: {e}")
    if not agrees(result):
        pytest.xfail(f"upstream: {VERSIONS}: PEFT {what} disagrees with the independent reference")
    return result


def tensors_agree(expected, atol=1e-5, rtol=1e-5) -> Callable[[object], bool]:
    """An ``agrees`` predicate: every tensor of ``expected`` close to the same field of a result."""
    def agrees(got) -> bool:
        exp = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = got if isinstance(got, (tuple, list)) else (got,)
        if len(exp) != len(got):
            return False
        return all(_close(g, e, atol, rtol) for g, e in zip(got, exp))
    return agrees
