"""The dependency pins: requirements*.txt, constraints.txt and the environment the tests run in agree."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{path.name}: {line!r} is not pinned with =="
        pins[_canonical(name)] = version.strip()
    return pins


CONSTRAINTS = _pins(ROOT / "constraints.txt")


@pytest.mark.parametrize("requirements", ["requirements.txt", "requirements-dev.txt"])
def test_every_requirement_is_pinned_and_locked_at_the_same_version(requirements):
    pins = _pins(ROOT / requirements)
    assert pins
    for name, version in pins.items():
        assert CONSTRAINTS.get(name) == version, f"{name}: {requirements} says {version}, constraints.txt says " \
                                                 f"{CONSTRAINTS.get(name)} (run `make lock`)"


def test_the_environment_is_the_locked_one():
    """What `make setup-dev` installs is what constraints.txt records, dependencies of dependencies included."""
    wrong = {}
    for name, version in CONSTRAINTS.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed: {wrong}"
