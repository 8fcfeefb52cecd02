"""User-facing configurations of the prompt methods (keyword names are a public contract, DESIGN.md).

Checks that need no model run here, at construction (a clear error, nothing built); checks that
need the model (sites it has, its position limit) run in ``ptkernels.prompts.build``.

MLP reparameterization is *enabled* by ``projection_hidden_size``: ``None`` / ``False`` / ``0`` =
no MLP (the prefix K/V are the parameters); ``True`` = an MLP with the original code's 512 hidden
units; an int ``h`` = an MLP with ``h`` hidden units.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ptkernels.backends.eager_gpc import GATES

DEFAULT_PROJECTION_HIDDEN = 512   # PT-code `mid_dim`, P2-code `prefix_hidden_size`
PREFIX_INITS = ("random", "zero", "words")
PROMPT_INITS = ("random", "words", "vocab")
PREFIX_SITES = ("self", "encoder", "decoder", "cross")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_dropout(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def _check_projection(value) -> None:
    if value is None or value is False or value is True:
        return
    if not isinstance(value, int) or value < 0:
        raise ValueError("projection_hidden_size must be None/False (no MLP), True (MLP with "
                         f"{DEFAULT_PROJECTION_HIDDEN} hidden units) or an int >= 1, got {value!r}")


def _check_token_ids(init: str, ids) -> Optional[tuple]:
    if init != "words":
        if ids is not None:
            raise ValueError(f"init_token_ids is only used with init='words', got init={init!r}")
        return None
    if ids is None:
        raise ValueError("init='words' needs init_token_ids (the token ids of the initializing words)")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = tuple(ids)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"init_token_ids must be a non-empty sequence of token ids >= 0, got {ids!r}")
    return ids


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def projection_size(value) -> Optional[int]:
    """The MLP hidden size a ``projection_hidden_size`` value means (None: no MLP)."""
    if value is None or value is False or value == 0:
        return None
    if value is True:
        return DEFAULT_PROJECTION_HIDDEN
    return int(value)


@dataclasses.dataclass
class GPCConfig:
    """The Global Prompt Cell (``reference/methods.md`` 3.3): one gated cell shared by all layers.

    ``variant``: "lstm" (default), "candidate", "gru" or "reinject". ``forget_bias``: initial bias
    of the gate that multiplies the memory S, so the cell starts near "keep memory" (for "gru",
    whose gate multiplies U, the gate bias starts at ``-forget_bias``).
    """
    variant: str = "lstm"
    forget_bias: float = 1.0

    def __post_init__(self):
        if self.variant not in GATES:
            raise ValueError(f"GPCConfig.variant must be one of {sorted(GATES)}, got {self.variant!r}")
        if isinstance(self.forget_bias, bool) or not isinstance(self.forget_bias, (int, float)):
            raise TypeError(f"GPCConfig.forget_bias must be a float, got {self.forget_bias!r}")


@dataclasses.dataclass
class PrefixTuningConfig:
    """Prefix-tuning (Li & Liang 2021): a trainable key/value prefix of length P at every attention
    layer of every chosen site.

    ``init``: "random" (N(0, 1) K/V, or the MLP's default init), "zero", or "words": the frozen
    model's own keys/values of ``init_token_ids`` (the original code's ``get_gold_init``);
    ``num_virtual_tokens`` must then equal ``len(init_token_ids)``. ``sites`` (encoder-decoder
    models): any of "encoder", "decoder", "cross"; None = every site the model has.
    ``num_tasks`` > 1 holds a bank of prefixes chosen per row by task id.
    ``train_head``: on a classification / QA model, its task head (``trainable_head_names``) stays
    trainable, as PEFT keeps it for sequence classification (``modules_to_save``); False freezes it.
    """
    num_virtual_tokens: int
    projection_hidden_size: Optional[int] = None
    prefix_dropout: float = 0.0
    init: str = "random"
    init_token_ids: Optional[Sequence[int]] = None
    sites: Optional[Sequence[str]] = None
    num_tasks: int = 1
    position_offset: bool = True
    train_head: bool = True

    method = "prefix_tuning"

    def __post_init__(self):
        _check_count("PrefixTuningConfig.num_virtual_tokens", self.num_virtual_tokens)
        _check_count("PrefixTuningConfig.num_tasks", self.num_tasks)
        _check_projection(self.projection_hidden_size)
        _check_dropout("PrefixTuningConfig.prefix_dropout", self.prefix_dropout)
        _check_flag("PrefixTuningConfig.train_head", self.train_head)
        if self.init not in PREFIX_INITS:
            raise ValueError(f"PrefixTuningConfig.init must be one of {PREFIX_INITS}, got {self.init!r}")
        self.init_token_ids = _check_token_ids(self.init, self.init_token_ids)
        if self.init == "words" and len(self.init_token_ids) != self.num_virtual_tokens:
            raise ValueError(
                f"init='words' uses one prefix slot per word token: num_virtual_tokens "
                f"({self.num_virtual_tokens}) must equal len(init_token_ids) ({len(self.init_token_ids)})")
        if self.sites is not None:
            if isinstance(self.sites, str):
                self.sites = (self.sites,)
            self.sites = tuple(self.sites)
            bad = [s for s in self.sites if s not in PREFIX_SITES]
            if bad or not self.sites or len(set(self.sites)) != len(self.sites):
                raise ValueError(f"PrefixTuningConfig.sites must be distinct names from {PREFIX_SITES}, "
                                 f"got {self.sites!r}")

    @property
    def projection(self) -> Optional[int]:
        return projection_size(self.projection_hidden_size)


@dataclasses.dataclass
class PTuningV2Config:
    """P-Tuning v2 (Liu et al. 2022): deep prompts (a K/V prefix) at every attention layer, no
    reparameterization by default, dropout on the prefix K/V as the official code applies it
    (``prefix_dropout``, in training only). The task head of classification models stays trainable
    (``ptkernels.prompts.trainable_head_names``) unless ``train_head=False``."""
    num_virtual_tokens: int
    projection_hidden_size: Optional[int] = None
    prefix_dropout: float = 0.1
    num_tasks: int = 1
    position_offset: bool = True
    train_head: bool = True

    method = "p_tuning_v2"
    init = "random"
    init_token_ids = None
    sites = None

    def __post_init__(self):
        _check_count("PTuningV2Config.num_virtual_tokens", self.num_virtual_tokens)
        _check_count("PTuningV2Config.num_tasks", self.num_tasks)
        _check_projection(self.projection_hidden_size)
        _check_dropout("PTuningV2Config.prefix_dropout", self.prefix_dropout)
        _check_flag("PTuningV2Config.train_head", self.train_head)

    @property
    def projection(self) -> Optional[int]:
        return projection_size(self.projection_hidden_size)


@dataclasses.dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al. 2021): m soft prompt rows prepended to the input embeddings,
    optionally carried across layers by a Global Prompt Cell (``gpc=GPCConfig(...)``).

    ``init``: "random" (normal, scaled to the RMS of the model's vocabulary embeddings), "vocab"
    (embeddings of random vocabulary tokens), or "words" (embeddings of ``init_token_ids``,
    repeated cyclically / truncated to ``num_virtual_tokens`` as PEFT's TEXT init does).
    ``num_tasks`` > 1: a bank of T prompts; ``input_prompts()`` returns (T, m, hidden).
    ``train_head``: as in ``PrefixTuningConfig`` (a new classification head stays trainable).
    """
    num_virtual_tokens: int
    init: str = "random"
    init_token_ids: Optional[Sequence[int]] = None
    gpc: Optional[GPCConfig] = None
    num_tasks: int = 1
    train_head: bool = True

    method = "prompt_tuning"

    def __post_init__(self):
        _check_count("PromptTuningConfig.num_virtual_tokens", self.num_virtual_tokens)
        _check_count("PromptTuningConfig.num_tasks", self.num_tasks)
        _check_flag("PromptTuningConfig.train_head", self.train_head)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptTuningConfig.init must be one of {PROMPT_INITS}, got {self.init!r}")
        self.init_token_ids = _check_token_ids(self.init, self.init_token_ids)
        if self.gpc is not None and not isinstance(self.gpc, GPCConfig):
            raise TypeError(f"PromptTuningConfig.gpc must be a GPCConfig or None, got {type(self.gpc).__name__}")


PROMPT_CONFIGS = (PrefixTuningConfig, PTuningV2Config, PromptTuningConfig)
