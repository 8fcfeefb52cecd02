"""Measured backend routing: which backend ``auto`` runs per op on a CUDA device, from timings.

``benchmarks/bench_routing.py --gpu`` (one of the benchmarks ``make gpu-check`` runs) times every
available backend on representative shapes of each route key (``ROUTE_KEYS``) and writes a
routing table. ``backends.resolve`` then follows the table's order on a CUDA device whose name
and software versions match it, and the estimated order (``backends.AUTO_ORDER``) everywhere
else; either way a backend that is not available for the call is passed over.

Where the table is looked for: the file named by ``PTKERNELS_ROUTING_TABLE``, else
``<cache>/ptkernels/routing/<device slug>.json`` with <cache> = ``$XDG_CACHE_HOME`` or
``~/.cache``. A table for another GPU, other versions, or one that cannot be read is ignored and
``ptkernels info`` says why: routing never fails a call.

The table is JSON::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "created": "2026-...Z",
     "versions": {"torch": ..., "cuda": ..., "triton": ..., "ptkernels": ...},
     "routes": {"prefix_attention": ["triton", "cuda"], ...},      # fastest first
     "timings_ms": {"prefix_attention": {"triton": 1.23, "cuda": 1.87, "eager": null}, ...},
     "setup": {"prefix_attention": "B=4 Hq=16 ...", ...}}

A timing of null is a backend that could not run the shape (left out of the route).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from datetime import datetime, timezone
from typing import NamedTuple

FORMAT = 1
ROUTE_KEYS = ("prefix_attention", "prefix_attention/decode", "gpc_cell")
ENV_PATH = "PTKERNELS_ROUTING_TABLE"
_BACKENDS = ("eager", "triton", "cuda")   # backends.BACKENDS (not imported: no cycle)


def device_slug(device_name: str) -> str:
    """A file-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"device_name must contain a letter or digit, got {device_name!r}")
    return slug


def current_versions() -> dict:
    """The software versions a table is valid for: torch, its CUDA, triton, ptkernels."""
    from importlib import metadata

    import torch

    def dist_version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": dist_version("triton"), "ptkernels": dist_version("ptkernels")}


def default_path(device_name: str) -> str:
    """Where ``bench_routing.py`` writes, and ``resolve`` reads, the table of ``device_name``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ptkernels", "routing", device_slug(device_name) + ".json")


def rank(timings: dict) -> list[str]:
    """Backends with a finite timing (ms), fastest first (ties in ``BACKENDS`` order)."""
    for name, ms in timings.items():
        if name not in _BACKENDS:
            raise ValueError(f"timings: backend must be one of {_BACKENDS}, got {name!r}")
        if ms is not None and not (isinstance(ms, (int, float)) and ms >= 0):
            raise ValueError(f"timings[{name!r}] must be a non-negative number of ms or None, "
                             f"got {ms!r}")
    timed = [n for n in _BACKENDS if timings.get(n) is not None and math.isfinite(timings[n])]
    return sorted(timed, key=lambda n: (timings[n], _BACKENDS.index(n)))


def build_table(device_name: str, timings: dict, setup: dict | None = None,
                versions: dict | None = None, created: str | None = None) -> dict:
    """A routing table from ``timings`` = {route key: {backend: median ms or None}}."""
    for key in timings:
        if key not in ROUTE_KEYS:
            raise ValueError(f"timings: route key must be one of {ROUTE_KEYS}, got {key!r}")
    routes = {key: rank(t) for key, t in timings.items()}
    table = {"format": FORMAT, "device": str(device_name),
             "created": created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "versions": dict(versions if versions is not None else current_versions()),
             "routes": routes, "timings_ms": {k: dict(t) for k, t in timings.items()},
             "setup": dict(setup or {})}
    validate(table)
    return table


def validate(table) -> None:
    """Raise ValueError naming what is wrong with a routing table."""
    if not isinstance(table, dict):
        raise ValueError(f"a routing table is a JSON object, got {type(table).__name__}")
    if table.get("format") != FORMAT:
        raise ValueError(f"format must be {FORMAT}, got {table.get('format')!r}")
    for field, kind in (("device", str), ("versions", dict), ("routes", dict)):
        if not isinstance(table.get(field), kind):
            raise ValueError(f"{field} must be a {kind.__name__}, got {table.get(field)!r}")
    for key, route in table["routes"].items():
        if key not in ROUTE_KEYS:
            raise ValueError(f"routes: key must be one of {ROUTE_KEYS}, got {key!r}")
        if not isinstance(route, list) or any(n not in _BACKENDS for n in route) \
                or len(set(route)) != len(route):
            raise ValueError(f"routes[{key!r}] must list distinct backends of {_BACKENDS}, "
                             f"got {route!r}")


def write_table(table: dict, path: str) -> str:
    """Write ``table`` to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``): a reader sees the old table or the new one, never a partial file."""
    validate(table)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".routing-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_table(path: str) -> dict:
    """Read and validate the table at ``path`` (OSError, ValueError)."""
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from exc
    validate(table)
    return table


class Status(NamedTuple):
    """The routing that applies to one device: ``table`` (None: the estimates), where it was
    looked for, and why it is (not) used."""
    table: dict | None
    path: str | None
    reason: str


_STATUS: dict = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the tables read so far (a rewritten table is then read again)."""
    with _LOCK:
        _STATUS.clear()


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def status(device) -> Status:
    """The routing of a CUDA ``device``. Cached per device and ``PTKERNELS_ROUTING_TABLE``: the
    op path pays one dict lookup, not a file read (``clear_cache`` reads the tables again)."""
    key = (os.environ.get(ENV_PATH), str(device))
    with _LOCK:
        cached = _STATUS.get(key)
    if cached is not None:
        return cached
    try:
        name = _device_name(device)
    except Exception as exc:  # noqa: BLE001 - routing never fails a call: use the estimates
        result = Status(None, key[0], f"no GPU name for {device} ({exc}): estimated order")
    else:
        result = _status(key[0] or default_path(name), name)
    with _LOCK:
        _STATUS[key] = result
    return result


def _status(path: str, name: str) -> Status:
    if not os.path.exists(path):
        return Status(None, path, f"no routing table at {path}: estimated order")
    try:
        table = load_table(path)
    except (OSError, ValueError) as exc:
        return Status(None, path, f"routing table {path} ignored: {exc}")
    if table["device"] != name:
        return Status(None, path, f"routing table {path} ignored: measured on "
                                  f"{table['device']!r}, this GPU is {name!r}")
    now = current_versions()
    stale = {k: (table["versions"].get(k), v) for k, v in now.items()
             if table["versions"].get(k) != v}
    if stale:
        diff = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(stale.items()))
        return Status(None, path, f"routing table {path} ignored: measured with other versions "
                                  f"({diff}); rerun benchmarks/bench_routing.py --gpu")
    return Status(table, path, f"measured routing table {path} ({table.get('created', '?')})")


def measured_order(route_key: str, device, fallback: tuple) -> tuple | None:
    """The backends to try for ``route_key`` on a CUDA ``device`` from its measured table: the
    measured order, then the rest of ``fallback`` (backends the measurement could not run); None
    when no table applies or it has no route for the key."""
    st = status(device)
    if st.table is None:
        return None
    route = st.table["routes"].get(route_key)
    if not route:
        return None
    return tuple(route) + tuple(n for n in fallback if n not in route)
