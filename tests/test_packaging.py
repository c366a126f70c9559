"""The library's dependencies are tested ranges that install beside an image's own torch (NGC, Python 3.12);
the project's own setup pins exact versions in constraints.txt, inside those ranges."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEPENDENCIES = {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["dependencies"])}
PINS = {canonicalize_name(r.name): r for r in (Requirement(line.split("#")[0]) for line in
        (ROOT / "constraints.txt").read_text().splitlines() if line.split("#")[0].strip())}


def _pinned_version(name: str) -> Version:
    (spec,) = PINS[name].specifier
    assert spec.operator == "==", f"constraints.txt: {PINS[name]} must pin {name} exactly (==)"
    return Version(spec.version)


def test_requires_python_admits_3_11_and_3_12():
    requires = SpecifierSet(PROJECT["requires-python"])
    assert requires.contains("3.11.7") and requires.contains("3.12.1"), requires


def test_torch_megatron_and_einops_are_ranges_pinned_exactly_in_constraints():
    for name in ("torch", "megatron-core", "einops"):
        assert name in DEPENDENCIES, f"{name} must be a dependency in pyproject.toml"
        specifier = DEPENDENCIES[name].specifier
        assert all(spec.operator not in ("==", "===") for spec in specifier), \
            f"{name} ({specifier}) must be a range in pyproject.toml, its exact pin lives in constraints.txt"
        assert any(spec.operator in ("<", "~=") for spec in specifier), \
            f"{name} ({specifier}) needs an upper bound: the next minor is untested"
        assert specifier.contains(_pinned_version(name)), f"constraints.txt's {PINS[name]} is outside {specifier}"


def test_every_constraints_pin_is_inside_its_dependency_range():
    for name, pin in PINS.items():
        version = _pinned_version(name)
        if name in DEPENDENCIES:
            assert DEPENDENCIES[name].specifier.contains(version), \
                f"constraints.txt's {pin} does not satisfy pyproject.toml's {DEPENDENCIES[name]}"


def test_an_ngc_prerelease_build_of_the_pinned_torch_minor_satisfies_the_range():
    # NGC images ship torch as a pre-release of the next version with a local tag; a range that refuses it
    # makes pip replace the image's torch with a PyPI (CUDA) build.
    pinned = _pinned_version("torch")
    ngc = Version(f"{pinned.major}.{pinned.minor}.0a0+5228986c39.nv26.11")
    assert DEPENDENCIES["torch"].specifier.contains(ngc), (str(ngc), str(DEPENDENCIES["torch"].specifier))


def test_the_makefile_installs_the_constraints_torch_first():
    makefile = (ROOT / "Makefile").read_text()
    first_installs = re.findall(r"\$\((?:PIP|PEERS_VENV)\)[^\n]*?install --quiet torch==(\S+)\n", makefile)
    assert first_installs and {Version(v) for v in first_installs} == {_pinned_version("torch")}, first_installs
