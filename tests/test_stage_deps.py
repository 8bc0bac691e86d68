"""Every library file a stage imports is one of that stage's DVC deps.

A stage whose code is not in its ``deps`` keeps stale results marked current: editing the file
changes what the stage would compute, yet ``dvc status`` says nothing changed (issue 13: the
training stages imported ``qlora_diag/data.py`` and ``prefix_sharing.py`` without listing them).
The walk follows every ``import`` statement of the stage script and, transitively, of each
``qlora_diag`` module it reaches -- also imports inside functions, which run too -- and counts
the package ``__init__.py`` files that importing a submodule executes.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "qlora_diag"


def module_file(name: str) -> Path | None:
    """``qlora_diag.train.losses`` -> its file under the repository, or None outside the package."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"import of {name}: no such module file under {REPO}")


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module an ``import`` in ``path`` loads, with their parent packages
    (importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # ``from qlora_diag.report import verdicts`` imports the submodule verdicts
            for alias in node.names:
                if module_file_or_none(f"{node.module}.{alias.name}") is not None:
                    names.add(f"{node.module}.{alias.name}")
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


def module_file_or_none(name: str) -> Path | None:
    try:
        return module_file(name)
    except AssertionError:
        return None


def files_imported_by(script: Path) -> set[Path]:
    """The package files ``script`` loads, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in imported_modules(todo.pop()):
            f = module_file(name)
            if f is not None and f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


def stage_scripts(dvc_yaml: dict) -> dict[str, tuple[Path, list[str]]]:
    """stage name -> (the stage script its cmd runs, its deps as written)."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        m = re.search(r"\bstages/\w+\.py\b", stage["cmd"])
        assert m, f"stage {name}: cmd {stage['cmd']!r} runs no stages/*.py script"
        out[name] = (REPO / m.group(0), [d if isinstance(d, str) else next(iter(d))
                                          for d in stage["deps"]])
    return out


def uncovered(script: Path, deps: list[str]) -> list[str]:
    """Files the stage runs that no dep covers (a dep covers itself and everything below it)."""
    dep_paths = [(REPO / d).resolve() for d in deps]
    # the package root is empty by test_the_package_root_holds_no_code
    needed = {script, *files_imported_by(script)} - {REPO / PACKAGE / "__init__.py"}
    return sorted(str(f.relative_to(REPO)) for f in needed
                  if not any(f == d or d in f.parents for d in dep_paths))


def load_dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


@pytest.mark.parametrize("stage", sorted(load_dvc_yaml()["stages"]))
def test_every_imported_file_is_a_dep_of_the_stage(stage):
    script, deps = stage_scripts(load_dvc_yaml())[stage]
    missing = uncovered(script, deps)
    assert not missing, (f"dvc.yaml stage {stage!r} runs {script.relative_to(REPO)}, which imports "
                         f"{missing}; add their folders to the stage's deps")


def test_the_walk_finds_imports_inside_functions_and_parent_packages():
    """Known answer: the train stage reaches prefix sharing only through the loss and generation
    modules, and the prepared split loader only through the trainer."""
    files = {str(f.relative_to(REPO)) for f in files_imported_by(REPO / "stages/train.py")}
    assert {"qlora_diag/train/prefix_sharing.py", "qlora_diag/data/batching.py",
            "qlora_diag/__init__.py", "qlora_diag/train/__init__.py"} <= files
    assert not any(f.startswith("qlora_diag/report/") for f in files)


def test_removing_a_dep_is_caught():
    stages = stage_scripts(load_dvc_yaml())
    for stage, removed in (("train_qlora", "qlora_diag/train"), ("compare", "qlora_diag/data"),
                           ("plot", "qlora_diag/core")):
        script, deps = stages[stage]
        assert removed in deps
        missing = uncovered(script, [d for d in deps if d != removed])
        assert missing and all(m.startswith(removed + "/") for m in missing), (stage, missing)


def test_the_package_root_holds_no_code():
    """``qlora_diag/__init__.py`` runs for every stage but no stage can list it without listing
    the whole package; it must stay empty (a docstring at most)."""
    tree = ast.parse((REPO / PACKAGE / "__init__.py").read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert not body
