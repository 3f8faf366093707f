"""constraints.txt: every requirement of pyproject.toml pinned for each supported Python, within
pyproject's ranges, and this environment installed through it (what CI tested is what runs)."""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from lock import LOCK, PYTHONS, lock_text, locked, normalise  # noqa: E402

THIS_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (*project["dependencies"], *project["optional-dependencies"]["test"])]


@pytest.mark.parametrize("python", PYTHONS)
def test_every_requirement_is_pinned_within_its_range(python):
    pins = locked(LOCK, python)
    assert pins, f"constraints.txt pins nothing for Python {python}"
    for requirement in requirements():
        name = normalise(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned for Python {python}: python tools/lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]} for Python {python}, outside pyproject's {requirement}"
        )
        for extra in requirement.extras:  # e.g. ray[tune], moto[server]: their own requirements too
            wanted = metadata.requires(requirement.name) or []
            for dependency in (Requirement(r) for r in wanted):
                if dependency.marker and dependency.marker.evaluate({"extra": extra, "python_version": python}):
                    assert normalise(dependency.name) in pins, f"{requirement.name}[{extra}] needs {dependency.name}"


def test_markers_select_one_version_per_python(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text(
        lock_text({"3.11": {"numpy": "2.4.6", "torch": "2.14.1"}, "3.12": {"numpy": "2.5.5", "torch": "2.14.1"}}, "t")
    )
    text = lock.read_text()
    assert "torch==2.14.1\n" in text and 'numpy==2.4.6 ; python_version == "3.11"' in text
    assert locked(lock, "3.11") == {"numpy": "2.4.6", "torch": "2.14.1"}
    assert locked(lock, "3.12") == {"numpy": "2.5.5", "torch": "2.14.1"}


@pytest.mark.skipif(THIS_PYTHON not in PYTHONS, reason=f"constraints.txt covers Python {', '.join(PYTHONS)}")
def test_this_environment_is_the_locked_one():
    """The suite passes for the versions in the lock, and for those the suite ran with here."""
    pins = locked(LOCK, THIS_PYTHON)
    differ = []
    for name, version in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            differ.append(f"{name} (locked {version}) is not installed")
            continue
        if have != version:
            differ.append(f"{name} {have} installed, {version} locked")
    assert not differ, (
        'this environment was not installed through constraints.txt (pip install -c constraints.txt -e ".[test]"): '
        + "; ".join(differ)
    )
