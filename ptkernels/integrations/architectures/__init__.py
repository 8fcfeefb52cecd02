"""The architecture registry: one ``Architecture`` entry per supported ``config.model_type``,
grouped by family (``decoders``, ``encoders``, ``seq2seq``); see ``base.py`` for what an entry
holds. Adding an architecture = adding one entry to its family's ``ENTRIES`` (plus a tiny model
in ``tests/tiny_models.py``, which the tests check against this registry).
"""
from __future__ import annotations

from ptkernels.integrations.architectures import decoders, encoders, seq2seq
from ptkernels.integrations.architectures.base import Architecture

FAMILIES = {"decoder": decoders.ENTRIES, "encoder": encoders.ENTRIES, "seq2seq": seq2seq.ENTRIES}

ARCHITECTURES: dict[str, Architecture] = {}
for _family, _entries in FAMILIES.items():
    for _arch in _entries:
        if _arch.family != _family or _arch.model_type in ARCHITECTURES:
            raise RuntimeError(f"architecture registry: bad entry {_arch.model_type!r}")
        ARCHITECTURES[_arch.model_type] = _arch

SUPPORTED = tuple(sorted(ARCHITECTURES))


def lookup(model) -> Architecture:
    """The registry entry for ``model`` or a ValueError naming the supported model types."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"ptkernels.patch_model does not support model_type={model_type!r} "
                         f"({type(model).__name__}); supported model types: {', '.join(SUPPORTED)}")
    return ARCHITECTURES[model_type]


def of_family(family: str) -> tuple[str, ...]:
    """The model types of one family, in registry order."""
    return tuple(a.model_type for a in FAMILIES[family])


__all__ = ["Architecture", "ARCHITECTURES", "SUPPORTED", "FAMILIES", "lookup", "of_family"]
