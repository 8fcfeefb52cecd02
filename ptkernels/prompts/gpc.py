"""The Global Prompt Cell as a module: one gated cell shared by all layers (time axis = layer).

``reference/methods.md`` 3.3. After layer l the integration calls ``S = gpc(U, S)`` with U (B, m, d)
the prompt rows the layer produced, and writes the result back into the prompt rows before the
next layer; ``S0 = gpc.initial_state(prompt_rows)`` before the first layer. The math runs through
``ptkernels.gpc_cell`` (eager on CPU, the fused Triton/CUDA kernel on GPUs).

Variant "reinject" keeps S = the original prompt P fixed (H_p = F * U + R * P). ``step(U, S, P)``
takes P explicitly and keeps no state in the module (what the integration calls: concurrent
forwards share the cell); ``gpc(U, S)`` after ``initial_state(P)`` remembers P in the module, for
direct single-threaded use.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ptkernels.backends.eager_gpc import num_gates
from ptkernels.ops.gpc_cell import gpc_cell


class GlobalPromptCell(nn.Module):
    """``weight`` (2d, n_gates*d) and ``bias`` (n_gates*d,), gate blocks in ``eager_gpc`` order."""

    def __init__(self, hidden_size: int, variant: str = "lstm", forget_bias: float = 1.0,
                 dtype=torch.float32, device=None, backend: str = "auto"):
        super().__init__()
        d, n = hidden_size, num_gates(variant)
        self.variant, self.hidden_size, self.backend = variant, d, backend
        self.weight = nn.Parameter(torch.empty(2 * d, n * d, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(n * d, dtype=dtype, device=device))
        self._original = None
        with torch.no_grad():  # nn.Linear's default range for a 2d -> n*d map
            bound = 1.0 / math.sqrt(2 * d)
            self.weight.uniform_(-bound, bound)
            # the gate that multiplies the memory starts open ("keep memory", LSTM practice)
            if variant in ("lstm", "candidate"):
                self.bias[:d] = forget_bias          # f multiplies S
            elif variant == "reinject":
                self.bias[d:] = forget_bias          # r multiplies S = P
            else:                                    # gru: (1 - g) multiplies S
                self.bias[:] = -forget_bias

    def initial_state(self, prompt_rows: torch.Tensor) -> torch.Tensor:
        """S0 = the prompt rows as fed to the first layer, (B, m, d)."""
        self._original = prompt_rows if self.variant == "reinject" else None
        return prompt_rows

    def step(self, update: torch.Tensor, state: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """S' for the prompt rows ``update`` (B, m, d) after a layer; ``original``: the prompt
        rows fed to the first layer (the memory of "reinject"). Touches no module state."""
        if self.variant == "reinject":
            state = original
        w, b = self.weight.to(update.dtype), self.bias.to(update.dtype)
        return gpc_cell(update, state.to(update.dtype), w, b, variant=self.variant,
                        backend=self.backend)

    def forward(self, update: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        original = self._original if self._original is not None else state
        return self.step(update, state, original)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, variant={self.variant!r}"
