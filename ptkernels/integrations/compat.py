"""Version-robust access to transformers internals (every 5.x release ptkernels supports).

transformers renames forward arguments between releases; a hook that reads or writes an argument
by a name one release had breaks silently on the next (5.24 renamed ``past_key_values`` to
``cache`` and the learned positional embeddings' ``past_key_values_length`` to ``cache_length``).
Everything the integration asks of a forward signature goes through this module, which looks the
argument up by signature and accepts every known spelling. Nothing here imports transformers.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch

# The cache argument of model forwards / generate, newest spelling first. 5.24: ``cache``
# (``past_key_values`` is a deprecated alias until 5.40, dropped when both are given).
CACHE_ARGS = ("cache", "past_key_values")
# The integer "tokens already in the cache" argument of learned positional embeddings.
CACHE_LENGTH_ARGS = ("cache_length", "past_key_values_length")


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable) -> tuple[tuple[str, ...], frozenset]:
    """(positional parameter names in order, all parameter names) of ``fn``."""
    sig = inspect.signature(fn)
    positional = tuple(n for n, prm in sig.parameters.items()
                       if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD))
    return positional, frozenset(sig.parameters)


def bind(fn: Callable, args: tuple, kwargs: dict) -> tuple[tuple[str, ...], dict]:
    """(positional names of ``fn``, {name: value} of the given call) without defaults."""
    names, _ = _parameters(getattr(fn, "__func__", fn))
    if inspect.ismethod(fn):
        names = names[1:]
    got = dict(zip(names, args))
    got.update(kwargs)
    return names, got


def replace(names, args: tuple, kwargs: dict, key: str, value):
    """The call (args, kwargs) with argument ``key`` set to ``value`` (positional if passed so)."""
    if key in names and names.index(key) < len(args):
        args = list(args)
        args[names.index(key)] = value
        return tuple(args), kwargs
    kwargs = dict(kwargs)
    kwargs[key] = value
    return args, kwargs


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` has a parameter called ``name``."""
    return name in _parameters(getattr(fn, "__func__", fn))[1]


def first_accepted(fn: Callable, names: tuple[str, ...]) -> Optional[str]:
    """The first of ``names`` that ``fn`` accepts, or None."""
    for name in names:
        if accepts(fn, name):
            return name
    return None


def cache_arg_name(fn: Callable) -> str:
    """The spelling of the cache argument ``fn`` takes (``cache`` on 5.24+)."""
    return first_accepted(fn, CACHE_ARGS) or CACHE_ARGS[-1]


def cache_of(got: dict):
    """The cache object of a bound call under any of its spellings (None without one)."""
    for name in CACHE_ARGS:
        value = got.get(name)
        if value is not None:
            return value
    return None


def cache_length(cache) -> int:
    """How many tokens ``cache`` already holds (the one place that answers this question).

    ``cache``: None, a ``Cache`` (``get_seq_length()``), an ``EncoderDecoderCache`` (its
    self-attention part), or a legacy tuple of per-layer (k, v) with k (B, H, N, D).
    """
    if cache is None:
        return 0
    inner = getattr(cache, "self_attention_cache", None)
    if inner is not None:
        cache = inner
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):
        if not cache or cache[0] is None:
            return 0
        return int(cache[0][0].shape[-2])
    raise TypeError(f"cannot tell the length of a cache of type {type(cache).__name__}")


def cache_length_of_call(got: dict) -> int:
    """Tokens already cached for a bound model-forward call: the cache, else an explicit length."""
    cache = cache_of(got)
    if cache is not None:
        return cache_length(cache)
    for name in CACHE_LENGTH_ARGS:
        value = got.get(name)
        if value is not None:
            return int(value)
    return 0


def output_cache(output):
    """The cache field of a model output (``cache`` on 5.24+, ``past_key_values`` before)."""
    for name in CACHE_ARGS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def t5_relative_bias(bias_module, query_length: int, key_length: int, past_seen: int, device):
    """``T5Attention.compute_bias`` for queries at ``past_seen .. past_seen + query_length - 1``.

    The query offset is ``past_seen_tokens`` (an int) from transformers 5.10 on and
    ``cache_position`` (a tensor of query positions) before; -> (1, H, query_length, key_length)."""
    fn = bias_module.compute_bias
    if accepts(fn, "past_seen_tokens"):
        return fn(query_length, key_length, device=device, past_seen_tokens=past_seen)
    if accepts(fn, "cache_position"):
        positions = torch.arange(past_seen, past_seen + query_length, device=device)
        return fn(query_length, key_length, device=device, cache_position=positions)
    raise TypeError(f"{type(bias_module).__name__}.compute_bias takes neither past_seen_tokens nor "
                    "cache_position: cannot place the prefix columns of the relative bias")
