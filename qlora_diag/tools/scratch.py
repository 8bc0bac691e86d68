"""A throw-away copy of this DVC project with overridden params, for `make smoke` and the
end-to-end tests: the real pipeline, real `dvc`, in its own git repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

# What the pipeline needs from the repository; DVC outputs and caches are not copied.
# .dvc/plots holds the page template .dvc/config names (plots.html_template).
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "stages", "qlora_diag",
                 ".dvc/config", ".dvc/plots")


def set_key(params: dict, dotted: str, value) -> None:
    """``set_key(p, "train.max_steps", 4)``; the key must already exist (no silent additions)."""
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    if leaf not in node:
        raise KeyError(f"{dotted}: not a key of params.yaml")
    node[leaf] = value


def make_scratch_project(repo: Path, dest: Path, overrides: dict) -> Path:
    """Copy the project at ``repo`` into ``dest`` (a new git + DVC repo with one commit) and
    apply ``overrides`` (dotted key -> value) to its params.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for key, value in overrides.items():
        set_key(params, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = scratch_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=smoke", "-c", "user.email=smoke@localhost",
                 "commit", "-qm", "scratch project"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def scratch_env() -> dict:
    """Environment for dvc in the scratch project: this interpreter's venv first on PATH (stage
    commands call `python`), offline hub, no analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
                "GIT_AUTHOR_NAME": "smoke", "GIT_AUTHOR_EMAIL": "smoke@localhost",
                "GIT_COMMITTER_NAME": "smoke", "GIT_COMMITTER_EMAIL": "smoke@localhost"})
    return env


def dvc(dest: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in the scratch project, output captured."""
    exe = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(exe), *args], cwd=dest, env=scratch_env(), text=True,
                          capture_output=True, check=check)
