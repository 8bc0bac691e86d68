"""pyproject.toml declares what the library needs; requirements.txt pins the tested stack."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, Version]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def test_every_runtime_dependency_is_pinned_and_its_pin_satisfies_the_lower_bound():
    declared = {canonicalize_name(r.name): r for r in map(
        Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])}
    locked = pins(REPO / "requirements.txt")
    assert set(declared) == set(locked), (set(declared) ^ set(locked))
    for name, req in declared.items():
        assert any(s.operator == ">=" for s in req.specifier), f"{req}: needs a lower bound"
        assert locked[name] in req.specifier, f"requirements.txt pins {name}=={locked[name]}, " \
                                              f"outside pyproject's {req}"


def test_test_only_packages_stay_out_of_the_runtime_lock():
    assert not set(pins(REPO / "requirements-test.txt")) & set(pins(REPO / "requirements.txt"))
