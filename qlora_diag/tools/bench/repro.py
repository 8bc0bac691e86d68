"""The cost of a no-op ``dvc repro``: what `make repro` costs when nothing changed."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

# No-op `dvc status` / `dvc repro` may not hang the benchmark.
DVC_TIMEOUT_S = 300


def time_noop_repro(repo_dir: Path) -> dict:
    """Wall time of ``dvc repro`` in ``repo_dir`` if ``dvc status`` says all is up to date;
    otherwise ``None`` and the reason (timing a repro that does work would measure that work)."""
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.is_file():
        return {"noop_repro_s": None, "reason": f"no dvc next to {sys.executable}"}

    def run(*args):
        return subprocess.run([str(dvc), *args], cwd=repo_dir, capture_output=True, text=True,
                              timeout=DVC_TIMEOUT_S)

    try:
        status = run("status", "--json")
        if status.returncode != 0:
            err = (status.stderr.strip().splitlines() or ["?"])[-1]
            return {"noop_repro_s": None, "reason": f"`dvc status` failed: {err}"}
        changed = sorted(json.loads(status.stdout or "{}"))
        if changed:
            return {"noop_repro_s": None,
                    "reason": f"workspace not up to date ({len(changed)} stage(s) changed, e.g. "
                              f"{', '.join(changed[:3])}); run `dvc repro` first"}
        t0 = time.perf_counter()
        repro = run("repro")
        elapsed = time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        return {"noop_repro_s": None,
                "reason": f"`{' '.join(exc.cmd[1:])}` took over {DVC_TIMEOUT_S} s"}
    if repro.returncode != 0:
        err = (repro.stderr.strip().splitlines() or ["?"])[-1]
        return {"noop_repro_s": None, "reason": f"`dvc repro` failed: {err}"}
    return {"noop_repro_s": elapsed, "reason": "dvc status: up to date"}
