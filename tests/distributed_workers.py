"""Worker processes of ``test_distributed.py``: a patched tiny model trained by DDP, FSDP2 and the
HF Trainer over a real gloo process group, and the single-process runs they must reproduce.

Two ways in:
* ``torch.multiprocessing`` spawns ``data_parallel_worker`` (rank, world, init file, out dir), which
  trains with DDP and then FSDP2; the process group rendezvous through a file (no port to pick,
  nothing to collide with).
* ``torchrun --standalone`` (or plain ``python``) runs this file as a script:
  ``python distributed_workers.py trainer OUT_FILE`` trains with ``transformers.Trainer``; under
  torchrun the Trainer (through accelerate) sees WORLD_SIZE/RANK and trains data-parallel over gloo.

Every run writes the trained prompt parameters (``ptk_prompts`` state dict, full tensors) of rank 0
to a file that the test compares with the single-process run.

The setup: a 2-layer Llama (tests/tiny_models.py) patched with ``PrefixTuningConfig(4,
projection_hidden_size=8)``; a batch of 4 rows of 7 tokens, rows 0 and 2 left-padded; 3 AdamW
steps with lr 1e-2. Data parallelism over 2 ranks gives each rank 2 rows and averages the
gradients, i.e. it minimizes the mean of the two half-batch losses: the single-process reference
computes exactly that. The Trainer run uses no padding (every half has the same token count), so
its data-parallel loss equals the single-process full-batch loss.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tiny_models as tm  # noqa: E402

STEPS = 3
LR = 1e-2
WORLD = 2


def patched_model():
    import ptkernels
    torch.manual_seed(0)
    model = tm.make("llama", initializer_range=0.5)
    ptkernels.patch_model(model, ptkernels.PrefixTuningConfig(4, projection_hidden_size=8))
    return model.train()


def data(pad: bool = True) -> dict:
    """4 rows: input_ids, attention_mask, labels (padded positions -100)."""
    batch = tm.labelled_batch("llama", b=4, n=7, pad="left" if pad else "none", seed=3)
    if pad:
        batch["attention_mask"][2, :1] = 0
        batch["input_ids"][2, :1] = tm.PAD
        batch["labels"][2, :1] = -100
    return batch


def shard(batch: dict, rank: int, world: int = WORLD) -> dict:
    rows = batch["input_ids"].shape[0] // world
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}


def prompt_state(model) -> dict:
    """The trained prompt parameters as plain full tensors (DTensor shards gathered)."""
    out = {}
    for name, value in model.ptk_prompts.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.detach().cpu().clone()
    return out


def _optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR)


def train_single() -> dict:
    """The reference: one process, loss = mean of the per-rank half-batch losses."""
    torch.set_num_threads(1)
    model = patched_model()
    opt = _optimizer(model)
    batch = data()
    for _ in range(STEPS):
        loss = sum(model(**shard(batch, r)).loss for r in range(WORLD)) / WORLD
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prompt_state(model)


def _init(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _train_parallel(wrapped, model, rank: int, out_dir: str, name: str) -> None:
    import torch.distributed as dist
    opt = _optimizer(wrapped)
    batch = shard(data(), rank)
    for _ in range(STEPS):
        loss = wrapped(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = prompt_state(model)   # collective for DTensors: every rank takes part
    if rank == 0:
        torch.save(state, os.path.join(out_dir, f"{name}.pt"))
    dist.barrier()


def data_parallel_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """DDP, then FSDP2, in the same processes (one process-group start for both: CI has 2 cores)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    _init(rank, world, init_file)
    try:
        model = patched_model()
        _train_parallel(DistributedDataParallel(model), model, rank, out_dir, "ddp")
        model = patched_model()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:     # FSDP2's usual wrapping: each layer, then the root
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert any(hasattr(p, "full_tensor") for p in model.parameters()), "fully_shard did nothing"
        _train_parallel(model, model, rank, out_dir, "fsdp")
    finally:
        dist.destroy_process_group()


# ---- HF Trainer (run as a script, under torchrun for 2 processes) --------------------------------

class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def train_trainer(out_file: str, tmp_dir: str) -> None:
    """``transformers.Trainer``: 3 steps over the 4-row dataset (one global batch of 4 per step)."""
    from transformers import Trainer, TrainingArguments
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = patched_model()
    args = TrainingArguments(
        output_dir=tmp_dir, per_device_train_batch_size=4 // world, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=0.0,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, seed=0, disable_tqdm=True, ddp_backend="gloo" if world > 1 else None)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(data(pad=False)))
    if trainer.args.world_size != world:
        raise RuntimeError(f"Trainer runs on {trainer.args.world_size} processes, expected {world}")
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(prompt_state(model), out_file)
    # Tear the gloo group down before the interpreter exits: left to the atexit/GC order, its
    # worker threads can be destroyed while joinable ("terminate called without an active
    # exception", SIGABRT after a successful run; seen once in CI).
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, out_file = sys.argv[1], sys.argv[2]
    if mode != "trainer":
        raise SystemExit(f"unknown mode {mode!r} (expected 'trainer')")
    train_trainer(out_file, os.path.dirname(os.path.abspath(out_file)))
