"""Prefix encoders (prefix-tuning, P-Tuning v2) and the prefix module the integration calls.

Layout. One ``PrefixEncoder`` per site produces the prefix K/V of all its layers at once as a
(L, 2, T, Hkv, P, D) tensor (2 = key, value; T = tasks of the bank). Without an MLP that tensor is
the parameter itself, so ``prefix_kv()`` hands out views: no copy per layer or batch row. With the
MLP (PT-code ``control_trans``): ``embedding`` (T, P, hidden) -> Linear(hidden, h) -> Tanh ->
Linear(h, L*2*Hkv*D); the output row of a prefix position is laid out as (L, 2, Hkv, D), the
original code's ``view(B, P, 2L, H, D)`` with index 2l + {0: key, 1: value}. The MLP is shared by
the tasks of a bank; each task has its own embedding rows.

PEFT's saved layout (``reference/ecosystem.md`` 2.6): ``prompt_embeddings`` (P, L*2*Hkv*D), decoded
by ``E.view(P, 2L, H, D).permute(1, 2, 0, 3).reshape(L, 2, H, P, D)``; ``to_peft_embeddings`` /
``from_peft_embeddings`` convert one task of a site both ways.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ptkernels.prompts.spec import ModelSpec, SiteSpec


def param_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Prompt parameters train in float32 (float64 for a float64 model); outputs are cast."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def peft_to_kv(emb: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT ``prompt_embeddings`` (P, L*2*Hkv*D) -> (L, 2, Hkv, P, D)."""
    p = emb.shape[0]
    if emb.dim() != 2 or emb.shape[1] != num_layers * 2 * num_kv_heads * head_dim:
        raise ValueError(f"prompt_embeddings must have shape (P, L*2*Hkv*D) = (P, "
                         f"{num_layers * 2 * num_kv_heads * head_dim}), got {tuple(emb.shape)}")
    return emb.view(p, 2 * num_layers, num_kv_heads, head_dim).permute(1, 2, 0, 3).reshape(
        num_layers, 2, num_kv_heads, p, head_dim)


def kv_to_peft(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, Hkv, P, D) -> PEFT ``prompt_embeddings`` (P, L*2*Hkv*D); inverse of ``peft_to_kv``."""
    layers, _, heads, p, dim = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(p, layers * 2 * heads * dim)


class PrefixEncoder(nn.Module):
    """The prefix of one site: ``forward() -> (L, 2, T, Hkv, P, D)`` in the parameter dtype."""

    def __init__(self, site: SiteSpec, num_tokens: int, num_tasks: int, hidden_size: int,
                 projection: Optional[int], dropout: float, init: str, dtype, device):
        super().__init__()
        self.site = site.name
        self.num_layers, self.num_kv_heads, self.head_dim = site.num_layers, site.num_kv_heads, site.head_dim
        self.num_tokens, self.num_tasks = num_tokens, num_tasks
        self.dropout = nn.Dropout(dropout)
        width = self.num_layers * 2 * self.num_kv_heads * self.head_dim
        kw = dict(dtype=dtype, device=device)
        if projection is None:
            self.prefix = nn.Parameter(torch.empty(self.num_layers, 2, num_tasks, self.num_kv_heads,
                                                   num_tokens, self.head_dim, **kw))
            self.embedding = self.mlp = None
            with torch.no_grad():
                if init == "zero":
                    self.prefix.zero_()
                else:  # P2-code: nn.Embedding's N(0, 1)
                    self.prefix.normal_()
        else:
            self.prefix = None
            self.embedding = nn.Parameter(torch.randn(num_tasks, num_tokens, hidden_size, **kw))
            self.mlp = nn.Sequential(nn.Linear(hidden_size, projection, **kw), nn.Tanh(),
                                     nn.Linear(projection, width, **kw))
            if init == "zero":  # PEFT init_weights="zero": the output layer starts at zero
                with torch.no_grad():
                    self.mlp[2].weight.zero_()
                    self.mlp[2].bias.zero_()

    @property
    def has_mlp(self) -> bool:
        return self.mlp is not None

    def raw(self) -> torch.Tensor:
        """(L, 2, T, Hkv, P, D) without dropout."""
        if self.mlp is None:
            return self.prefix
        out = self.mlp(self.embedding)                      # (T, P, L*2*Hkv*D)
        t, p = out.shape[:2]
        return out.view(t, p, self.num_layers, 2, self.num_kv_heads, self.head_dim).permute(2, 3, 0, 4, 1, 5)

    def forward(self) -> torch.Tensor:
        kv = self.raw()
        return self.dropout(kv) if self.training and self.dropout.p > 0 else kv

    @torch.no_grad()
    def set_kv(self, kv: torch.Tensor, task: Optional[int] = None) -> None:
        """Make the (no-dropout) output equal ``kv``: (L, 2, T, Hkv, P, D), or (L, 2, Hkv, P, D) for
        one ``task``. Without an MLP this copies; with an MLP, the output layer is solved by least
        squares on the hidden activations of the (random) embedding, which is exact when
        P * T <= the MLP width (the original code fits the MLP by MSE instead)."""
        if task is not None:
            full = self.raw().detach().clone()
            full[:, :, task] = kv.to(full)
            kv = full
        expected = (self.num_layers, 2, self.num_tasks, self.num_kv_heads, self.num_tokens, self.head_dim)
        if tuple(kv.shape) != expected:
            raise ValueError(f"prefix for site {self.site!r} must have shape (L, 2, T, Hkv, P, D) = "
                             f"{expected}, got {tuple(kv.shape)}")
        if self.mlp is None:
            self.prefix.copy_(kv.to(self.prefix))
            return
        lin = self.mlp[2]
        z = torch.tanh(self.mlp[0](self.embedding)).reshape(-1, lin.in_features).double()  # (T*P, h)
        target = kv.permute(2, 4, 0, 1, 3, 5).reshape(z.shape[0], -1).double()             # (T*P, width)
        ones = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
        sol = torch.linalg.lstsq(torch.cat([z, ones], 1).cpu(), target.cpu(), driver="gelsd").solution
        lin.weight.copy_(sol[:-1].t().to(lin.weight))
        lin.bias.copy_(sol[-1].to(lin.bias))

    @torch.no_grad()
    def merge(self) -> None:
        """Collapse the MLP into a plain prefix parameter (outputs unchanged)."""
        if self.mlp is None:
            return
        kv = self.raw().detach().contiguous()
        self.prefix = nn.Parameter(kv)
        self.embedding = None
        self.mlp = None

    def to_peft_embeddings(self, task: int = 0) -> torch.Tensor:
        """One task's prefix in PEFT's ``prompt_embeddings`` layout (P, L*2*Hkv*D)."""
        return kv_to_peft(self.raw()[:, :, task].detach())

    def from_peft_embeddings(self, emb: torch.Tensor, task: int = 0) -> None:
        self.set_kv(peft_to_kv(emb, self.num_layers, self.num_kv_heads, self.head_dim), task=task)


class PrefixPromptModule(nn.Module):
    """``kind == "prefix"``: prefix-tuning and P-Tuning v2.

    ``prefix_kv() -> {site: (K, V)}``, K and V (L_site, T, Hkv, P, D) in the model's dtype, computed
    once per forward (MLP and dropout applied; dropout only in training mode).
    """
    kind = "prefix"
    gpc = None

    def __init__(self, config, spec: ModelSpec, sites: list[str]):
        super().__init__()
        self.config, self.method = config, config.method
        self.num_virtual_tokens, self.num_tasks = config.num_virtual_tokens, config.num_tasks
        self.position_offset = config.position_offset
        self.model_dtype = spec.dtype
        pdtype = param_dtype(spec.dtype)
        self.encoders = nn.ModuleDict({
            s: PrefixEncoder(spec.sites[s], config.num_virtual_tokens, config.num_tasks, spec.hidden_size,
                             config.projection, config.prefix_dropout,
                             "zero" if config.init == "zero" else "random", pdtype, spec.device)
            for s in sites})

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.encoders)

    def prefix_kv(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for site, enc in self.encoders.items():
            kv = enc().to(self.model_dtype)
            out[site] = (kv[:, 0], kv[:, 1])
        return out

    def merge(self) -> "PrefixPromptModule":
        for enc in self.encoders.values():
            enc.merge()
        return self

    def to_peft_embeddings(self, site: str, task: int = 0) -> torch.Tensor:
        return self.encoders[site].to_peft_embeddings(task)

    def from_peft_embeddings(self, site: str, emb: torch.Tensor, task: int = 0) -> None:
        self.encoders[site].from_peft_embeddings(emb, task)

    def stored_parameters(self) -> int:
        """Parameters kept after ``merge()`` (what the paper's "0.1%" counts)."""
        return sum(e.num_layers * 2 * e.num_tasks * e.num_kv_heads * e.num_tokens * e.head_dim
                   for e in self.encoders.values())
