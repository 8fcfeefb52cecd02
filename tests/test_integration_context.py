"""The prefix context belongs to the call, not the model: concurrent forwards on one patched model
from several threads give exactly the serial results, and activation checkpointing recomputes each
layer with the prefix of the forward it recomputes (any number of forwards before one backward
give exact gradients), on every architecture family."""
import threading

import pytest
import torch

import ptkernels
import tiny_models as tm
from ptkernels.integrations import patch_model


def _threaded(fn, jobs, threads=2):
    """Run fn(job) for every job, ``threads`` at a time, all released together; results by job."""
    results, errors = {}, []
    barrier = threading.Barrier(threads)

    def worker(mine):
        try:
            barrier.wait()
            for job in mine:
                results[job] = fn(job)
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
    workers = [threading.Thread(target=worker, args=(jobs[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("kind", ["bank", "gpc"])
def test_two_threads_fifty_forwards_equal_serial(kind):
    if kind == "bank":
        model = tm.make("llama")
        patch_model(model, ptkernels.PrefixTuningConfig(num_virtual_tokens=4, num_tasks=2),
                    backend="eager")
        batch = tm.batch("llama", pad="right")
        calls = {j: dict(batch, task_ids=torch.full((3,), j % 2)) for j in range(100)}
    else:
        model = tm.make("bert")
        patch_model(model, ptkernels.PromptTuningConfig(num_virtual_tokens=3,
                                                        gpc=ptkernels.GPCConfig()),
                    backend="eager")
        with torch.no_grad():
            model.ptk_prompts.gpc.weight.normal_(0, 0.2)
        calls = {j: tm.batch("bert", pad="right", seed=1 + j % 2) for j in range(100)}

    def run(j):
        with torch.no_grad():
            return model(**calls[j]).logits
    serial = {j: run(j) for j in (0, 1)}
    assert not torch.equal(serial[0], serial[1])   # the two threads' calls differ
    got = _threaded(run, list(range(100)))
    wrong = [j for j in range(100) if not torch.equal(got[j], serial[j % 2])]
    assert not wrong, f"{len(wrong)} of 100 threaded forwards differ from the serial result"


def _two_forwards_grads(model_type, cfg, checkpointing, seed=0, reentrant=False):
    model = tm.make(model_type)
    patch_model(model, cfg, backend="eager")
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:   # reentrant checkpoints need an input that requires grad
            model.enable_input_require_grads()
    torch.manual_seed(seed)
    total = 0
    for call in range(2):   # two forwards (different tasks / inputs), then one backward
        batch = tm.batch(model_type, pad="right", seed=1 + call)
        kw = {"task_ids": torch.full((3,), call)} if getattr(cfg, "num_tasks", 1) > 1 else {}
        out = model(**batch, **kw)
        logits = out.logits
        total = total + logits.square().mean() * (call + 1)
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CKPT = [
    ("llama", "bank", ptkernels.PrefixTuningConfig(num_virtual_tokens=4, num_tasks=2)),
    ("llama", "ptv2", ptkernels.PTuningV2Config(num_virtual_tokens=4, prefix_dropout=0.1)),
    ("bert", "ptv2", ptkernels.PTuningV2Config(num_virtual_tokens=4, prefix_dropout=0.1)),
    ("bert", "bank", ptkernels.PrefixTuningConfig(num_virtual_tokens=3, num_tasks=2)),
    ("deberta-v2", "ptv2", ptkernels.PTuningV2Config(num_virtual_tokens=4, prefix_dropout=0.1)),
    ("bart", "bank", ptkernels.PrefixTuningConfig(num_virtual_tokens=3, num_tasks=2)),
    ("bert", "gpc", ptkernels.PromptTuningConfig(num_virtual_tokens=3, gpc=ptkernels.GPCConfig())),
]


@pytest.mark.parametrize("model_type,what,cfg", CKPT, ids=[f"{m}-{w}" for m, w, _ in CKPT])
def test_checkpointing_two_forwards_one_backward_exact(model_type, what, cfg):
    ref = _two_forwards_grads(model_type, cfg, checkpointing=False)
    got = _two_forwards_grads(model_type, cfg, checkpointing=True)
    assert ref.keys() == got.keys() and ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_reentrant_checkpointing_two_forwards_exact():
    cfg = ptkernels.PrefixTuningConfig(num_virtual_tokens=4, num_tasks=2)
    ref = _two_forwards_grads("llama", cfg, checkpointing=False)
    got = _two_forwards_grads("llama", cfg, checkpointing=True, reentrant=True)
    assert ref.keys() == got.keys() and ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_enabled_before_patch_is_wrapped_too():
    cfg = ptkernels.PrefixTuningConfig(num_virtual_tokens=4, num_tasks=2)
    ref = _two_forwards_grads("llama", cfg, checkpointing=False)
    model = tm.make("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch_model(model, cfg, backend="eager")
    torch.manual_seed(0)
    total = 0
    for call in range(2):
        out = model(**tm.batch("llama", pad="right", seed=1 + call), task_ids=torch.full((3,), call))
        total = total + out.logits.square().mean() * (call + 1)
    total.backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)
