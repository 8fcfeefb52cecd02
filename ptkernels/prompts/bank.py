"""Prefix banks: ``num_tasks = T`` prompts in one module, chosen per batch row by task id.

Prefix methods keep a (L, T, Hkv, P, D) bank per site (``prefix_kv``) and the integration hands
``prefix_attention`` the task ids as ``prefix_index``; prompt tuning returns (T, m, d) from
``input_prompts`` and ``select_prompts`` picks each row's prompt. ``extract_task`` / ``insert_task``
move one task's prompt between a bank and a single-task module of the same method.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_task_ids(task_ids: Optional[torch.Tensor], num_tasks: int, batch: int) -> Optional[torch.Tensor]:
    """Validate ``task_ids`` (B,) int64 in [0, T); None is allowed only for T == 1."""
    if task_ids is None:
        if num_tasks > 1:
            raise ValueError(f"this prompt bank holds {num_tasks} tasks: pass task_ids (B,) to choose "
                             "each row's prompt")
        return None
    if not isinstance(task_ids, torch.Tensor) or task_ids.dim() != 1 or task_ids.shape[0] != batch:
        raise ValueError(f"task_ids must be a (B,) = ({batch},) integer tensor, got "
                         f"{getattr(task_ids, 'shape', type(task_ids).__name__)}")
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    # The range check reads the data: under torch.compile it would break the graph (as in
    # prefix_attention's prefix_index check, compiled code trusts the ids).
    if batch and not torch.compiler.is_compiling() and (
            int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(f"task_ids must lie in [0, {num_tasks}), got values in "
                         f"[{int(task_ids.min())}, {int(task_ids.max())}]")
    return task_ids.long()


def select_prompts(prompts: torch.Tensor, task_ids: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """(T, m, d) bank -> (B, m, d) rows (an expand, not a copy, when T == 1)."""
    ids = check_task_ids(task_ids, prompts.shape[0], batch)
    if ids is None:
        return prompts.expand(batch, -1, -1)
    return prompts.index_select(0, ids.to(prompts.device))


@torch.no_grad()
def extract_task(bank, single, task: int) -> None:
    """Copy task ``task`` of ``bank`` into the single-task module ``single`` (same method, T == 1)."""
    _copy_task(bank, single, src=task, dst=0)


@torch.no_grad()
def insert_task(single, bank, task: int) -> None:
    """Copy the single-task module's prompt into row ``task`` of ``bank``."""
    _copy_task(single, bank, src=0, dst=task)


def _copy_task(src_mod, dst_mod, src: int, dst: int) -> None:
    if src_mod.kind != dst_mod.kind:
        raise ValueError(f"cannot move a {src_mod.kind!r} prompt into a {dst_mod.kind!r} module")
    if src_mod.kind == "input":
        dst_mod.prompts[dst].copy_(src_mod.prompts[src])
        if src_mod.gpc is not None and dst_mod.gpc is not None:
            dst_mod.gpc.load_state_dict(src_mod.gpc.state_dict())
        return
    for site, enc in src_mod.encoders.items():
        dst_mod.encoders[site].set_kv(enc.raw()[:, :, src].detach(), task=dst)
