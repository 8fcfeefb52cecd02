"""``torch.compile`` of patched models: one graph per forward (zero graph breaks) with and without a
padding mask, ``fullgraph=True`` for the forward and for a training step, outputs equal eager.

The compiles use the ``aot_eager`` backend: it runs everything that decides whether a graph breaks
(Dynamo, AOTAutograd, the custom ops' fake implementations, the backward graph) without Inductor's
C++ code generation, which takes minutes on a 2-core CI machine. A counting backend checks that each
distinct call signature produced exactly one graph.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import tiny_models as tm
from ptkernels import GPCConfig, PrefixTuningConfig, PromptTuningConfig, backends
from ptkernels.integrations import patch_model


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    # An empty backend cache: the first call's backend import happens inside the compiled region,
    # as in a fresh process (it used to break the graph in every attention layer).
    monkeypatch.setattr(backends, "_loaded", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _close(a, b, what, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


CASES = {
    "llama-prefix": ("llama", lambda: PrefixTuningConfig(4), None),
    "llama-bank": ("llama", lambda: PrefixTuningConfig(3, projection_hidden_size=8, num_tasks=3),
                   torch.tensor([2, 0, 1])),
    "bert-prompt-gpc": ("bert", lambda: PromptTuningConfig(3, gpc=GPCConfig()), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_one_graph_with_and_without_padding(case):
    model_type, make_cfg, task_ids = CASES[case]
    model = patch_model(tm.make(model_type), make_cfg()).eval()
    batch = tm.batch(model_type)
    extra = {} if task_ids is None else {"task_ids": task_ids}
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for inputs in ({"input_ids": batch["input_ids"]}, batch):   # no mask, then a padding mask
            got = compiled(**inputs, **extra).logits
            _close(got, model(**inputs, **extra).logits, f"{case}, inputs {sorted(inputs)}")
    # fullgraph=True raises on any graph break; the count also catches a silent extra graph
    assert counter.frame_count == 2, f"{counter.frame_count} graphs for 2 call signatures"


def _train(forward, model, batch, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = forward(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.ptk_prompts.named_parameters()}


def test_training_step_fullgraph_equals_eager():
    """3 AdamW steps through the compiled forward (and its compiled backward graph) == eager."""
    batch = tm.labelled_batch("llama")
    cfg = PrefixTuningConfig(4, projection_hidden_size=8)
    eager_model = patch_model(tm.make("llama"), cfg).train()
    compiled_model = patch_model(tm.make("llama"), cfg).train()
    compiled_model.ptk_prompts.load_state_dict(eager_model.ptk_prompts.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter)
    eager_losses, eager_params = _train(eager_model, eager_model, batch)
    losses, params = _train(compiled, compiled_model, batch)
    _close(losses, eager_losses, "losses")
    for name, value in eager_params.items():
        _close(params[name], value, name)
    assert counter.frame_count == 1
    assert (eager_losses[-1] < eager_losses[0]).item()
