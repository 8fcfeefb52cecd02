"""The committed locks, the supported ranges and the Makefile agree with each other.

requirements/test.in names the direct dependencies with the supported ranges, requirements/lock.txt
pins the tested set (every transitive package), requirements/lock-oldest.txt the oldest supported
transformers/PEFT, pyproject.toml states the ranges to users. A hand edit that lets them drift (a
pin outside its range, a lower bound nobody tests, a package missing from the lock) fails here.
"""
import pathlib
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"


def _pins(path: pathlib.Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{path.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements(lines) -> list[Requirement]:
    out = []
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            out.append(Requirement(line))
    return out


def _pyproject_requirements() -> list[Requirement]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomli = pytest.importorskip("tomli")
        tomllib = tomli
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return _requirements(lines)


def _lower_bound(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    assert lows, f"{req} states no lower bound"
    return max(lows)


LOCKS = [p for p in (REQ / "lock.txt", REQ / "lock-oldest.txt")]


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_lock_pins_every_direct_dependency_within_its_range(lock):
    pins = _pins(lock)
    for req in _requirements((REQ / "test.in").read_text().splitlines()):
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} does not pin {req.name}"
        if lock.name == "lock.txt" or name not in ("transformers", "peft"):
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"{lock.name} pins {req.name}=={pins[name]}, outside requirements/test.in's {req}"
    assert "torch" in pins and "triton" in pins


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_locks_satisfy_the_ranges_pyproject_states(lock):
    pins = _pins(lock)
    for req in _pyproject_requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} does not pin {req.name} (pyproject.toml needs it)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{lock.name} pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"


def test_pyproject_lower_bounds_are_the_tested_oldest_versions():
    """The transformers and PEFT lower bounds users are told are exactly what test-oldest runs."""
    oldest = _pins(REQ / "lock-oldest.txt")
    makefile = (ROOT / "Makefile").read_text()
    declared = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)",
                               re.search(r"^OLDEST\s*:=(.*)$", makefile, re.M).group(1)))
    reqs = {canonicalize_name(r.name): r for r in _pyproject_requirements()}
    for name in ("transformers", "peft"):
        assert oldest[name] == Version(declared[name]), \
            f"lock-oldest.txt pins {name}=={oldest[name]}, the Makefile's OLDEST says {declared[name]}"
        low = _lower_bound(reqs[name])
        assert (oldest[name].major, oldest[name].minor) == (low.major, low.minor), \
            f"pyproject.toml's lower bound {reqs[name]} is not the tested oldest {name}=={oldest[name]}"
