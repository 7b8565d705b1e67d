"""The lock files (what dev.py installs) agree with the ranges in requirements*.txt (what the project declares).

A range changed without `python3 dev.py lock` fails here: each declared package is pinned in its lock at a version
inside its range, every pin carries hashes, and the floors lock holds rq, redis-py and django-rq at exactly the
floors requirements.txt declares and everything else as the main lock does. (pip checks the hashes themselves at
install, and `pip check` that nothing a package needs is missing.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import dev

ROOT = Path(dev.__file__).resolve().parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def declared(path: Path) -> list[Requirement]:
    requirements = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirements.append(Requirement(line))
    return requirements


def pins(path: Path) -> dict[str, list[tuple[Version, Marker | None, int]]]:
    """Each pinned package of a lock: its version(s) (one per environment marker), marker and number of hashes."""
    found: dict[str, list] = {}
    current = None
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            name, version, marker = match.groups()
            current = [Version(version), Marker(marker) if marker else None, 0]
            found.setdefault(canonicalize_name(name), []).append(current)
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            current[2] += 1
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"{path.name}: a line that is neither a pin, a hash nor a comment: {line!r}")
    return {name: [tuple(entry) for entry in entries] for name, entries in found.items()}


@pytest.mark.parametrize("lock", sorted(dev.LOCKS))
def test_every_declared_package_is_locked_inside_its_range_with_hashes(lock):
    locked = pins(ROOT / lock)
    assert locked, f"{lock} pins nothing"
    for source in dev.LOCKS[lock]:
        for requirement in declared(ROOT / source):
            name = canonicalize_name(requirement.name)
            assert name in locked, f"{requirement.name} ({source}) is not in {lock}: run `python3 dev.py lock`"
            for version, _, _ in locked[name]:
                assert requirement.specifier.contains(version, prereleases=True), (
                    f"{lock} pins {requirement.name}=={version}, outside {source}'s {requirement.specifier}: "
                    "run `python3 dev.py lock`")
    for name, entries in locked.items():
        for version, _, hashes in entries:
            assert hashes, f"{lock}: {name}=={version} has no hash"


def test_a_package_in_an_extras_lock_and_the_main_lock_is_pinned_alike():
    """pip installs requirements.lock beside an extra's lock: a package in both must be the same pin."""
    main = pins(ROOT / "requirements.lock")
    for lock in ("requirements-mysql.lock", "requirements-browser.lock"):
        for name, entries in pins(ROOT / lock).items():
            if name in main:
                assert {version for version, _, _ in entries} == {version for version, _, _ in main[name]}, (
                    f"{lock} pins {name} differently from requirements.lock")


def test_the_floors_lock_pins_the_declared_floors_of_the_worker_stack():
    locked = pins(ROOT / "requirements-floors.lock")
    floors = {canonicalize_name(requirement.name): requirement for requirement in declared(ROOT / "requirements.txt")}
    for package in dev.FLOOR_PACKAGES:
        floor = next(spec.version for spec in floors[canonicalize_name(package)].specifier if spec.operator == ">=")
        assert [version for version, _, _ in locked[canonicalize_name(package)]] == [Version(floor)], (
            f"requirements-floors.lock must pin {package} at its declared floor {floor}: run `python3 dev.py lock`")


def test_the_floors_lock_differs_from_the_main_lock_only_in_the_floor_packages():
    floor_names = {canonicalize_name(package) for package in dev.FLOOR_PACKAGES}
    main, floors = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-floors.lock")
    versions = {name: sorted(str(version) for version, _, _ in entries) for name, entries in main.items()
                if name not in floor_names}
    assert {name: sorted(str(version) for version, _, _ in entries) for name, entries in floors.items()
            if name not in floor_names} == versions, "run `python3 dev.py lock`"
