"""One training run of the demo: AdamW on the trainable parameters, a progress bar, per-step loss
and wall time, the peak memory of one extra step, and the test accuracy."""
from __future__ import annotations

import dataclasses
import time

import torch

from ptkernels.measure import peak_memory, summary

WARMUP_STEPS = 3   # excluded from the step-time median (first-call allocations, lazy inits)


@dataclasses.dataclass
class RunResult:
    engine: str
    method: str
    seed: int
    losses: list[float]
    step_times_s: list[float]
    step_time: dict              # summary() of the steps after warm-up, seconds
    peak_memory_bytes: int | None
    test_accuracy: float
    trainable_parameters: int
    train_seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    return loss


@torch.no_grad()
def accuracy(model, batches) -> float:
    model.eval()
    right = total = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        pred = model(**inputs).logits.argmax(-1)
        right += (pred == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    model.train()
    return right / total


def _peak_of_one_step(model, opt, params, batch):
    """Peak memory of one more training step, measured apart from the timed ones (the probe
    slows ops down); its parameter and optimizer update is undone afterwards."""
    saved = [p.detach().clone() for p in params]
    opt_state = {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in v.items()}
                 for k, v in opt.state.items()}
    mem = peak_memory(lambda: _step(model, opt, batch))
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    for k, v in opt_state.items():
        opt.state[k] = v
    opt.zero_grad(set_to_none=True)
    return mem


def train_interleaved(models: list[tuple[str, str, object]], train_batches, test_batches, *,
                      seed: int, lr: float | dict[str, float], progress: bool = True,
                      desc: str = "") -> list[RunResult]:
    """Train several (engine, method, model) on the same batches, one step of each in turn.

    Interleaving is the A/B design: machine noise (other processes on shared cores) lands on
    every model alike instead of on whichever ran during a busy minute. The order of the models
    alternates from step to step so that none always runs right after another. Every model has
    its own AdamW (no weight decay) over its trainable parameters, with learning rate ``lr``, or
    ``lr[method]`` when ``lr`` maps methods to rates.
    """
    from tqdm.auto import tqdm
    torch.manual_seed(seed + 2)  # dropout masks
    state = []
    for engine, method, model in models:
        params = [p for p in model.parameters() if p.requires_grad]
        state.append(dict(engine=engine, method=method, model=model, params=params,
                          opt=torch.optim.AdamW(params, lr=lr[method] if isinstance(lr, dict) else lr,
                                                weight_decay=0.0),
                          losses=[], times=[], seconds=0.0))
        model.train()
    bar = tqdm(total=len(train_batches), desc=desc, disable=not progress, dynamic_ncols=True,
               unit="step")
    for i, batch in enumerate(train_batches):
        order = state if i % 2 == 0 else state[::-1]
        for run in order:
            t0 = time.perf_counter()
            loss = _step(run["model"], run["opt"], batch)
            dt = time.perf_counter() - t0
            run["times"].append(dt)
            run["seconds"] += dt
            run["losses"].append(loss.item())
        bar.set_postfix_str("  ".join(f"{r['engine'] if len(state) <= 2 else r['method']} "
                                      f"{r['losses'][-1]:.3f}" for r in state), refresh=False)
        bar.update(1)
    bar.close()
    results = []
    for run in state:
        mem = _peak_of_one_step(run["model"], run["opt"], run["params"], train_batches.batches[-1])
        acc = accuracy(run["model"], test_batches)
        times = run["times"]
        results.append(RunResult(run["engine"], run["method"], seed, run["losses"], times,
                                 summary(times[WARMUP_STEPS:] or times), mem, acc,
                                 sum(p.numel() for p in run["params"]), run["seconds"]))
    return results
