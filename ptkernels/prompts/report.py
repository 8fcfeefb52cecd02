"""Trainable-parameter report: how many parameters a prompt method trains and stores, and their
share of the model."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

from torch import nn


def _count(x, trainable_only: bool = False) -> int:
    if x is None:
        return 0
    if isinstance(x, int):
        return x
    return sum(p.numel() for p in x.parameters() if p.requires_grad or not trainable_only)


@dataclasses.dataclass
class ParameterReport:
    method: str
    prompt_parameters: int      # trainable parameters of the prompt module (MLP included)
    stored_parameters: int      # what is kept after merge() (the prefix itself; prompts + GPC)
    head_parameters: int        # trainable task-head parameters (P-Tuning v2 classification)
    base_parameters: int        # the frozen model's parameters

    @property
    def trainable(self) -> int:
        return self.prompt_parameters + self.head_parameters

    @property
    def total(self) -> int:
        return self.base_parameters + self.prompt_parameters

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def stored_share(self) -> float:
        return (self.stored_parameters + self.head_parameters) / self.base_parameters if self.base_parameters else 0.0

    def __str__(self) -> str:
        return (f"{self.method}: trainable {self.trainable:,} of {self.total:,} parameters "
                f"({100 * self.trainable_share:.4f}%); prompts {self.prompt_parameters:,}, "
                f"head {self.head_parameters:,}; stored after merge {self.stored_parameters + self.head_parameters:,} "
                f"({100 * self.stored_share:.4f}% of the base model's {self.base_parameters:,})")


def parameter_report(prompt_module: nn.Module, base: Union[nn.Module, int],
                     head: Optional[Union[nn.Module, int]] = None) -> ParameterReport:
    """Report for a built prompt module on a base model (an ``nn.Module`` or its parameter count;
    the prompt module's own parameters are not counted as base even if attached to it).
    ``head``: the trainable task head (module or count), if any."""
    prompt_ids = {id(p) for p in prompt_module.parameters()}
    if isinstance(base, nn.Module):
        base_count = sum(p.numel() for p in base.parameters() if id(p) not in prompt_ids)
    else:
        base_count = int(base)
    return ParameterReport(method=getattr(prompt_module, "method", type(prompt_module).__name__),
                           prompt_parameters=_count(prompt_module, trainable_only=True),
                           stored_parameters=prompt_module.stored_parameters(),
                           head_parameters=_count(head, trainable_only=True),
                           base_parameters=base_count)


def model_report(model: nn.Module) -> ParameterReport:
    """Report for a model patched with a prompt config (``patch_model(model, config)``): the
    prompt module is ``model.ptk_prompts``; trainable parameters outside it count as the head."""
    prompts = getattr(model, "ptk_prompts", None)
    if prompts is None:
        raise ValueError(f"{type(model).__name__} carries no ptkernels prompts: patch it with "
                         "ptkernels.patch_model(model, config) first")
    prompt_ids = {id(p) for p in prompts.parameters()}
    head = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in prompt_ids)
    return parameter_report(prompts, model, head)
