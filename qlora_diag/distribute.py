"""Fan a sweep's training stages out to SLURM and share the results through a DVC remote.

``python -m qlora_diag.distribute submit [--workdir DIR] [--max-parallel N] [-- SBATCH ARGS]``,
run at the root of this repository on a machine that can submit SLURM jobs:

1. reproduces the stages upstream of training (``base``, ``prepare``, ``quantize``) here and
   pushes their outputs to the default DVC remote (``dvc remote add -d``);
2. lists the training stages the params imply (:func:`training_stages`, the stage names of
   ``dvc.yaml``) and leaves out those the run-cache already answers, locally or in the remote
   (:func:`answered_by_run_cache`): after a failed or cancelled job, the rerun submits only what
   is missing;
3. writes two batch scripts into a sweep directory and submits them: an array job
   (``sbatch --array``), one task per missing stage, each cloning the committed repository,
   pulling the upstream outputs, running ``dvc repro --single-item <stage>`` and pushing the
   outputs, then the run-cache entry; and a final job that waits for the whole array
   (``--dependency=afterok``) and runs ``dvc repro --pull`` in this repository: every training
   stage is restored from the run-cache, only ``compare`` and ``plot`` run;
4. waits, printing each stage as its job ends, and reports the stages that failed or were
   cancelled with the path of their log.

``python -m qlora_diag.distribute status [SWEEP_DIR] [--wait]`` reports on a sweep later.

The jobs read the repository, its virtual environment and the sweep directory by the paths
they have here, so all three must be on a file system the compute nodes share (the usual home
or project directory of a cluster).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qlora_diag.core.config import Params, load_params
from qlora_diag.core.errors import UserError

DEFAULT_WORKDIR = Path(".dvc/tmp/distribute")  # git- and dvc-ignored (.dvc/.gitignore: /tmp)
ARRAY_SCRIPT = "train.sbatch"
FINAL_SCRIPT = "final.sbatch"
SWEEP_FILE = "sweep.json"
FINAL = "final"
OK = "ok"
SLURM_TOOLS = ("sbatch", "squeue", "scontrol", "scancel")
SQUEUE_RETRIES = 5  # consecutive squeue failures before waiting gives up
# Outputs of the pipeline that `dvc repro` rewrites in the working tree: they may differ from the
# commit the jobs clone without changing what the jobs compute.
OUTPUT_PATHS = ("dvc.lock", "reports/")
# squeue states of a job that has not ended yet (squeue lists ended jobs only briefly, as
# COMPLETING); anything else it shows counts as ended.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT",
                 "STOPPED", "RESV_DEL_HOLD"}


# --- what to run -------------------------------------------------------------------------------

def training_stages(p: Params) -> list[str]:
    """The ``dvc.yaml`` stages that train the runs ``p`` implies, each once, in the order of
    :func:`qlora_diag.compare.runs.all_runs` (rank sweep, noise-floor seeds, module sweep), e.g.
    ``train_lora@2``, ``seeds_qlora@1``, ``modules_lora@kv``."""
    from qlora_diag.compare.runs import all_runs, producing_stage

    stages: list[str] = []
    for spec in all_runs(p):
        stage = producing_stage(spec, p)
        if stage not in stages:
            stages.append(stage)
    return stages


def _open_repo(root: Path):
    from dvc.repo import Repo

    return Repo(str(root))


def _target(repo, name: str) -> str:
    # DVC resolves a bare stage name against the current directory, not the repository's root.
    return f"{os.path.join(repo.root_dir, 'dvc.yaml')}:{name}"


def upstream_stages(root: Path, stages: list[str]) -> list[str]:
    """The stages the training ``stages`` depend on (transitively), in ``dvc.yaml`` order,
    read from DVC's own pipeline graph; a stage name ``dvc.yaml`` lacks is a :class:`UserError`."""
    from dvc.exceptions import DvcException

    with _open_repo(root) as repo:
        names: set[str] = set()
        for name in stages:
            try:
                collected = repo.stage.collect(_target(repo, name), with_deps=True)
            except DvcException as exc:
                raise UserError(f"dvc.yaml: no stage {name!r} ({exc}); params.yaml implies it "
                                "(qlora_diag.compare.runs), so dvc.yaml and the library disagree: "
                                "restore dvc.yaml from git") from None
            names.update(s.name for s in collected)
        order = [s.name for s in repo.index.stages]
    return [s for s in order if s in names and s not in stages]


def answered_by_run_cache(root: Path, stages: list[str]) -> set[str]:
    """The ``stages`` whose run DVC's run-cache holds, here or in the default remote, with every
    output available: ``dvc repro`` would restore them instead of running them.

    This is what ``dvc repro --pull`` does for each stage (``dvc/stage/cache.py``,
    ``StageCache.restore``), without checking anything out: fetch the remote's run-cache entries
    (small YAML files), hash the stage's dependencies in the working tree (the upstream outputs
    must be there), look up the entry for its command, dependencies and params, and fetch the
    outputs that entry names into the local cache. An entry whose outputs are in neither cache
    does not count, as DVC would run that stage. Written against ``dvc==3.67.1`` (pinned in
    requirements.txt): the run-cache has no public API.
    """
    from dvc.exceptions import CollectCacheError, DvcException

    answered: set[str] = set()
    with _open_repo(root) as repo, repo.lock:
        try:
            repo.stage_cache.pull(None)
        except DvcException as exc:
            raise UserError(f"cannot read the run-cache of the default DVC remote ({exc}); "
                            "check that this machine reaches it (`dvc push` tells the same) "
                            "and its credentials in .dvc/config.local") from None
        for name in stages:
            stage = repo.stage.get_target(_target(repo, name))
            stage.save_deps()
            entry = repo.stage_cache._load(stage)
            if entry is None:
                continue
            cached = repo.stage_cache._create_stage(entry, wdir=stage.wdir)
            if not cached.outs_cached():
                try:
                    for objs in cached.get_used_objs().values():
                        repo.cloud.pull(objs)
                except CollectCacheError:
                    continue
            if cached.outs_cached():
                answered.add(name)
    return answered


def default_remote(root: Path) -> str:
    """The name of the default DVC remote, which the jobs and ``dvc repro --pull`` use."""
    with _open_repo(root) as repo:
        name = repo.config["core"].get("remote")
        remotes = sorted(repo.config["remote"])
    if not name:
        have = f" (configured: {', '.join(remotes)}; make one the default with `dvc remote " \
               "default NAME`)" if remotes else ""
        raise UserError("no default DVC remote: the jobs push their results to it and the final "
                        "step restores them from it. Add one with `dvc remote add -d NAME URL` "
                        "(a directory all nodes see, or s3://bucket/path) and commit "
                        f".dvc/config{have}")
    return name


def committed_head(root: Path) -> str:
    """The commit the jobs clone. Tracked files that differ from it (other than outputs that
    ``dvc repro`` rewrites: dvc.lock, reports/, .gitignore files) are a :class:`UserError`,
    since the jobs would not see the change."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=root, text=True, capture_output=True)
        if proc.returncode != 0:
            raise UserError(f"{root}: `git {' '.join(args)}` failed ({proc.stderr.strip()}); "
                            "the jobs clone this repository's last commit, so it must be a git "
                            "repository with at least one commit")
        return proc.stdout

    commit = git("rev-parse", "HEAD").strip()
    changed = []
    for line in git("status", "--porcelain", "--untracked-files=no").splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if path.startswith(OUTPUT_PATHS) or Path(path).name == ".gitignore":
            continue
        changed.append(path)
    if changed:
        raise UserError(f"{', '.join(changed)}: changed since the last commit ({commit[:12]}); "
                        "each job clones that commit, so it would not see the change. Commit "
                        "(`git commit -am ...`) or stash it, then submit again")
    return commit


# --- the batch scripts -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sweep:
    """One submission: the stages of the array (task i runs ``stages[i]``) and where
    everything lives. All paths are absolute, as the jobs see them."""

    repo: Path
    commit: str
    stages: tuple[str, ...]
    upstream: tuple[str, ...]
    dir: Path
    bin_dir: Path  # the virtual environment's bin/: dvc and python for the jobs
    sbatch_args: tuple[str, ...] = ()
    max_parallel: int | None = None

    def log(self, task: int | str) -> Path:
        return self.dir / "logs" / f"{task}.log"

    def status_file(self, task: int | str) -> Path:
        return self.dir / "status" / str(task)


def _q(value) -> str:
    return shlex.quote(str(value))


def _header(lines: list[str], sweep: Sweep) -> list[str]:
    return lines + [f"#SBATCH {arg}" for arg in sweep.sbatch_args]


def array_script(sweep: Sweep) -> str:
    """The ``sbatch --array`` script: array task i trains ``sweep.stages[i]`` in its own clone."""
    last = len(sweep.stages) - 1
    throttle = f"%{sweep.max_parallel}" if sweep.max_parallel else ""
    stages = " ".join(_q(s) for s in sweep.stages)
    header = _header([
        "#!/bin/bash",
        "# One training stage of a qlora-diagnostics sweep per array task, written by",
        f"# `python -m qlora_diag.distribute submit` in {sweep.repo} at commit {sweep.commit[:12]}.",
        "# A task clones that commit, pulls the outputs of the stages upstream of training (the",
        "# submitting machine pushed them; its dvc.lock, copied into the clone, names them), runs",
        "# its stage and pushes the outputs first, then the run-cache entry, to the default DVC",
        "# remote: an entry in the remote always has its outputs there.",
        "#SBATCH --job-name=qlora-train",
        f"#SBATCH --array=0-{last}{throttle}",
        f"#SBATCH --output={sweep.dir}/logs/%a.log",
    ], sweep)
    body = [
        "set -euo pipefail",
        f"STAGES=({stages})",
        'STAGE="${STAGES[$SLURM_ARRAY_TASK_ID]}"',
        f"SWEEP={_q(sweep.dir)}",
        'CLONE="$SWEEP/clones/$SLURM_ARRAY_TASK_ID"',
        'STATUS="$SWEEP/status/$SLURM_ARRAY_TASK_ID"',
        "trap 'echo \"failed (exit $?): $BASH_COMMAND\" > \"$STATUS\"' ERR",
        f"export PATH={_q(sweep.bin_dir)}:\"$PATH\"",
        'echo "$STAGE: array task $SLURM_ARRAY_TASK_ID, job ${SLURM_JOB_ID:-?} on $(hostname), '
        'in $CLONE"',
        'rm -rf "$CLONE"  # left by a failed or requeued attempt',
        f'git clone --quiet --no-checkout {_q(sweep.repo)} "$CLONE"',
        'cd "$CLONE"',
        f"git checkout --quiet {sweep.commit}",
        'cp "$SWEEP/dvc.lock" dvc.lock',
        f"if [ -f {_q(sweep.repo / '.dvc/config.local')} ]; then "
        f"cp {_q(sweep.repo / '.dvc/config.local')} .dvc/config.local; fi",
        f"dvc pull {' '.join(_q(s) for s in sweep.upstream)}",
        'dvc repro --single-item "$STAGE"',
        'dvc push "$STAGE"',
        'dvc push --run-cache "$STAGE"',
        'cd "$SWEEP"',
        'rm -rf "$CLONE"',
        f'echo {OK} > "$STATUS"',
    ]
    return "\n".join(header + body) + "\n"


def final_script(sweep: Sweep) -> str:
    """The job after the array: ``dvc repro --pull`` in the submitting repository.

    ``dvc pull --run-cache && dvc repro`` would not do: ``dvc pull --run-cache`` fetches the
    run-cache entries but only the outputs ``dvc.lock`` names, and fails on training stages the
    lock does not list yet; ``dvc repro --pull`` fetches the entries and, for each stage it
    restores, that entry's outputs.
    """
    status = sweep.status_file(FINAL)
    header = _header([
        "#!/bin/bash",
        "# The last step of a qlora-diagnostics sweep, written by `python -m qlora_diag.distribute",
        "# submit`: in the submitting repository, restore every training stage from the remote's",
        "# run-cache and run what depends on them (compare, plot).",
        "#SBATCH --job-name=qlora-final",
        f"#SBATCH --output={sweep.log(FINAL)}",
    ], sweep)
    body = [
        "set -euo pipefail",
        f"trap 'echo \"failed (exit $?): $BASH_COMMAND\" > {_q(status)}' ERR",
        f"export PATH={_q(sweep.bin_dir)}:\"$PATH\"",
        f"cd {_q(sweep.repo)}",
        "# The jobs trained the params of the submitted commit; refuse to mix in later edits.",
        f"if ! git diff --quiet {sweep.commit} -- params.yaml dvc.yaml; then",
        f"  echo \"params.yaml or dvc.yaml changed since commit {sweep.commit[:12]}, which the "
        f"jobs trained; restore them and run 'dvc repro --pull' yourself\" | tee {_q(status)}",
        "  exit 3",
        "fi",
        "dvc repro --pull",
        f"echo {OK} > {_q(status)}",
    ]
    return "\n".join(header + body) + "\n"


def write_sweep(sweep: Sweep, lock_text: str) -> None:
    """The sweep directory: both scripts, the dvc.lock the jobs copy, logs/ (with a
    ``<stage>.log`` link to each task's log) and status/."""
    for sub in ("logs", "status", "clones"):
        (sweep.dir / sub).mkdir(parents=True, exist_ok=True)
    (sweep.dir / "dvc.lock").write_text(lock_text)
    if sweep.stages:
        (sweep.dir / ARRAY_SCRIPT).write_text(array_script(sweep))
    (sweep.dir / FINAL_SCRIPT).write_text(final_script(sweep))
    for task, stage in enumerate(sweep.stages):
        link = sweep.dir / "logs" / f"{stage}.log"
        if not link.is_symlink():
            link.symlink_to(f"{task}.log")


def _check_path_for_sbatch(path: Path) -> None:
    # #SBATCH lines end at whitespace, and sbatch expands %-patterns in --output.
    if re.search(r"[\s%]", str(path)):
        raise UserError(f"--workdir {path}: holds a space or '%', which an #SBATCH --output line "
                        "cannot carry; choose a directory path without them")


# --- talking to SLURM --------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]


def _slurm(run: Runner, *args: str) -> str:
    proc = run(list(args), text=True, capture_output=True)
    if proc.returncode != 0:
        raise UserError(f"`{' '.join(args)}` failed (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def submit_jobs(sweep: Sweep, run: Runner = subprocess.run) -> tuple[str | None, str]:
    """Submit the array (if any stage is missing) and the final job; return their job ids."""
    array_id = None
    if sweep.stages:
        array_id = _slurm(run, "sbatch", "--parsable", str(sweep.dir / ARRAY_SCRIPT)).strip()
        array_id = array_id.split(";")[0]  # "<id>;<cluster>" on multi-cluster set-ups
    dep = [f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes"] if array_id else []
    final_id = _slurm(run, "sbatch", "--parsable", *dep, str(sweep.dir / FINAL_SCRIPT)).strip()
    return array_id, final_id.split(";")[0]


def queued_jobs(run: Runner = subprocess.run) -> dict[str, str]:
    """``{job id: state}`` of this user's jobs that squeue still lists, one entry per array
    task (``"12_3"``)."""
    out = _slurm(run, "squeue", "--me", "--noheader", "--array", "--format=%i|%T")
    jobs = {}
    for line in out.splitlines():
        if "|" in line:
            job, state = line.strip().split("|", 1)
            jobs[job] = state
    return jobs


def _scontrol_state(job: str, run: Runner) -> tuple[str, str] | None:
    """(JobState, ExitCode) of an ended job while slurmctld still remembers it (MinJobAge,
    300 s by default), else None."""
    proc = run(["scontrol", "--oneliner", "show", "job", job], text=True, capture_output=True)
    if proc.returncode != 0:
        return None
    state = re.search(r"\bJobState=(\S+)", proc.stdout)
    code = re.search(r"\bExitCode=(\S+)", proc.stdout)
    if not state:
        return None
    return state.group(1), code.group(1) if code else "?"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one job of the sweep ended (or that it has not)."""

    name: str    # stage name, or "final"
    job: str     # SLURM job id ("12_3" for an array task)
    state: str   # SLURM state (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...)
    detail: str  # what the job's own status file says, if anything
    log: Path

    @property
    def ended(self) -> bool:
        return self.state not in ACTIVE_STATES

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" or self.detail == OK


def job_outcome(name: str, job: str, status_file: Path, log: Path, queued: dict[str, str],
                run: Runner = subprocess.run) -> Outcome:
    """The state of ``job``: squeue's while it is queued; once it ended, the job's status file
    (written by the script's last line, or by its ERR trap) and slurmctld's record."""
    if job in queued and queued[job] in ACTIVE_STATES:
        return Outcome(name, job, queued[job], "", log)
    detail = status_file.read_text().strip() if status_file.is_file() else ""
    record = _scontrol_state(job, run)
    if detail == OK:
        state = "COMPLETED"
    elif record and record[0] not in ACTIVE_STATES:
        state = record[0]
        if not detail and record[0] != "COMPLETED":
            detail = f"exit code {record[1]} (no status written: cancelled or killed)"
    elif record:  # squeue missed it a moment ago but slurmctld has it running
        return Outcome(name, job, record[0], "", log)
    elif detail:
        state = "FAILED"
    elif log.exists():
        state, detail = "ENDED", ("started, then ended without writing its status: cancelled, "
                                  "timed out, killed (e.g. out of memory) or its node failed")
    else:
        # SLURM keeps no record of an array task cancelled while pending, and it never wrote
        # a log.
        state, detail = "NOT RUN", ("left the queue without starting: cancelled while "
                                    "pending, or SLURM could not launch it")
    return Outcome(name, job, state, detail, log)


def read_sweep(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; give a sweep directory that `python -m "
                        "qlora_diag.distribute submit` wrote (under .dvc/tmp/distribute/ unless "
                        "--workdir was given)") from None


def outcomes(info: dict, run: Runner = subprocess.run) -> tuple[list[Outcome], Outcome]:
    """The outcome of every array task and of the final job of a sweep (see :func:`read_sweep`)."""
    sweep_dir = Path(info["dir"])
    queued = queued_jobs(run)
    tasks = [job_outcome(stage, f"{info['array_job']}_{i}", sweep_dir / "status" / str(i),
                         sweep_dir / "logs" / f"{stage}.log", queued, run)
             for i, stage in enumerate(info["stages"])]
    final = job_outcome(FINAL, info["final_job"], sweep_dir / "status" / FINAL,
                        sweep_dir / "logs" / f"{FINAL}.log", queued, run)
    return tasks, final


def repro_summary(log_text: str) -> tuple[list[str], list[str]]:
    """(stages DVC ran, stages it restored from the run-cache), read from ``dvc repro`` output."""
    ran = re.findall(r"^Running stage '([^']+)'", log_text, re.M)
    restored = re.findall(r"^Stage '([^']+)' is cached - skipping run", log_text, re.M)
    return ran, restored


def _describe(o: Outcome) -> str:
    detail = f" ({o.detail})" if o.detail and o.detail != OK else ""
    return f"{o.name}: {o.state}{detail}; log {o.log}"


def wait_and_report(sweep_dir: Path, poll_s: float, out: Callable[[str], None] = print,
                    run: Runner = subprocess.run, wait: bool = True) -> int:
    """Follow a sweep until it ends (or report once with ``wait=False``); 0 when the final job
    completed, 1 when a stage or the final job failed, 3 while jobs are still queued."""
    info = read_sweep(sweep_dir)
    seen: set[str] = set()
    misses = 0
    while True:
        try:
            tasks, final = outcomes(info, run)
            misses = 0
        except UserError:
            # squeue fails now and then on a busy controller ("Socket timed out"); give up
            # only when it keeps failing.
            misses += 1
            if not wait or misses >= SQUEUE_RETRIES:
                raise
            time.sleep(poll_s)
            continue
        for o in tasks:
            if o.ended and o.name not in seen:
                seen.add(o.name)
                out(f"  [{len(seen)}/{len(tasks)}] {_describe(o)}")
        failed = [o for o in tasks if o.ended and not o.ok]
        if all(o.ended for o in tasks) and failed:
            if not final.ended:  # afterok can never be met; SLURM cancels it too
                run(["scancel", final.job], text=True, capture_output=True)
            done = len(tasks) - len(failed)
            out(f"distribute: {len(failed)} of {len(tasks)} stage(s) did not finish:")
            for o in failed:
                out(f"  {_describe(o)}")
            out(f"The results of the {done} that finished are in the remote's run-cache. The "
                f"final job {final.job} was cancelled. Rerun the same submit command: it submits "
                "only the stages the run-cache does not answer.")
            return 1
        if final.ended:
            if not final.ok:
                out(f"distribute: the final job failed: {_describe(final)}")
                return 1
            ran, restored = repro_summary(final.log.read_text() if final.log.is_file() else "")
            out(f"distribute: final job {final.job} completed: `dvc repro --pull` restored "
                f"{len(restored)} stage(s) from the run-cache and ran {', '.join(ran) or 'nothing'}; "
                f"log {final.log}")
            return 0
        if not wait:
            active = [o for o in (*tasks, final) if not o.ended]
            out(f"distribute: {len(active)} job(s) still queued or running: "
                + ", ".join(f"{o.name} {o.state}" for o in active))
            return 3
        time.sleep(poll_s)


# --- the command -------------------------------------------------------------------------------

def _dvc(root: Path, *args: str) -> None:
    """Run dvc (this environment's) in the repository, its output shown; a failure stops."""
    exe = Path(sys.executable).parent / "dvc"
    proc = subprocess.run([str(exe) if exe.exists() else "dvc", *args], cwd=root)
    if proc.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}) in {root}; its "
                        "output is above")


def submit(root: Path, workdir: Path, sbatch_args: list[str], max_parallel: int | None,
           poll_s: float, wait: bool, out: Callable[[str], None] = print) -> int:
    root = root.resolve()
    for name in ("dvc.yaml", "params.yaml"):
        if not (root / name).is_file():
            raise UserError(f"{root / name}: not found; run this at the root of the repository")
    params = load_params(root / "params.yaml")
    missing_tools = [t for t in (*SLURM_TOOLS, "git") if shutil.which(t) is None]
    if missing_tools:
        raise UserError(f"{', '.join(missing_tools)}: not found on PATH; submit from a machine "
                        "of the SLURM cluster (a login node), with the SLURM client commands "
                        "installed")
    bad = [a for a in sbatch_args if not a.startswith("-")]
    if bad:
        raise UserError(f"sbatch arguments {bad}: each must be an option such as "
                        "--partition=gpu or --gres=gpu:1, written with '=' as one word")
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel {max_parallel}: must be a positive number of jobs")
    workdir = (root / workdir).resolve()
    _check_path_for_sbatch(workdir)
    commit = committed_head(root)
    remote = default_remote(root)
    busy = unfinished_sweeps(workdir, queued_jobs())
    if busy:
        raise UserError(f"{busy[-1]}: this sweep still has jobs in the queue; submitting again "
                        "now would train its stages a second time. Wait for it (`python -m "
                        f"qlora_diag.distribute status {busy[-1]} --wait`) or cancel its jobs "
                        "(scancel), then submit")
    stages = training_stages(params)
    upstream = upstream_stages(root, stages)

    out(f"distribute: reproducing the upstream stages here ({', '.join(upstream)}) and pushing "
        f"their outputs to the remote {remote!r}")
    _dvc(root, "repro", *upstream)
    _dvc(root, "push", *upstream)
    answered = answered_by_run_cache(root, stages)
    missing = [s for s in stages if s not in answered]
    out(f"distribute: {len(stages)} training stages; the run-cache answers {len(answered)}, "
        f"{len(missing)} to run: {', '.join(missing) or 'none'}")

    workdir.mkdir(parents=True, exist_ok=True)
    sweep_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=workdir))
    sweep = Sweep(repo=root, commit=commit, stages=tuple(missing), upstream=tuple(upstream),
                  dir=sweep_dir, bin_dir=Path(sys.executable).parent,
                  sbatch_args=tuple(sbatch_args), max_parallel=max_parallel)
    write_sweep(sweep, (root / "dvc.lock").read_text())
    array_id, final_id = submit_jobs(sweep)
    info = {"dir": str(sweep_dir), "repo": str(root), "commit": commit, "remote": remote,
            "stages": list(missing), "answered": sorted(answered), "array_job": array_id,
            "final_job": final_id}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if array_id:
        out(f"distribute: submitted array job {array_id} ({len(missing)} task(s), script "
            f"{sweep_dir / ARRAY_SCRIPT}) and final job {final_id} after it")
    else:
        out(f"distribute: nothing to train; submitted final job {final_id}")
    out(f"distribute: logs in {sweep_dir / 'logs'} (one <stage>.log per stage)")
    if not wait:
        out(f"distribute: not waiting; follow it with `python -m qlora_diag.distribute status "
            f"{sweep_dir} --wait`")
        return 0
    return _follow(sweep_dir, poll_s, out)


def _follow(sweep_dir: Path, poll_s: float, out: Callable[[str], None]) -> int:
    try:
        return wait_and_report(sweep_dir, poll_s, out)
    except KeyboardInterrupt:
        out(f"distribute: stopped waiting; the jobs go on. Follow them with `python -m "
            f"qlora_diag.distribute status {sweep_dir} --wait`")
        return 130


def unfinished_sweeps(workdir: Path, queued: dict[str, str]) -> list[Path]:
    """Sweeps under ``workdir`` with a job still in the queue: submitting again meanwhile would
    train their stages twice, since the run-cache learns of a stage only when its job ends."""
    busy = []
    for path in sorted(Path(workdir).glob(f"*/{SWEEP_FILE}")):
        info = json.loads(path.read_text())
        ids = {info.get("array_job"), info.get("final_job")} - {None}
        if any(job == i or job.startswith(f"{i}_") for job, state in queued.items()
               if state in ACTIVE_STATES for i in ids):
            busy.append(path.parent)
    return busy


def latest_sweep(workdir: Path) -> Path:
    sweeps = sorted(p.parent for p in Path(workdir).glob(f"*/{SWEEP_FILE}"))
    if not sweeps:
        raise UserError(f"{workdir}: holds no sweep; submit one with `python -m "
                        "qlora_diag.distribute submit`, or give the sweep directory")
    return sweeps[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qlora_diag.distribute",
        description="Run the sweep's training stages as SLURM jobs; share results through "
                    "the default DVC remote.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit the missing training stages and the final step",
                       epilog="Arguments after -- go to both jobs as #SBATCH lines, e.g. "
                              "-- --partition=gpu --gres=gpu:1 --time=04:00:00")
    s.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="where sweeps (scripts, logs, clones) go; on a file system the nodes "
                        "share (default: %(default)s)")
    s.add_argument("--max-parallel", type=int, default=None,
                   help="at most this many training jobs at once (sbatch --array=...%%N)")
    s.add_argument("--poll", type=float, default=30.0, help="seconds between squeue polls")
    s.add_argument("--no-wait", action="store_true", help="submit and return")
    s.add_argument("sbatch_args", nargs=argparse.REMAINDER,
                   help="-- then sbatch options for both jobs")
    st = sub.add_parser("status", help="report on a sweep (default: the newest)")
    st.add_argument("sweep_dir", nargs="?", type=Path)
    st.add_argument("--wait", action="store_true", help="follow it until it ends")
    st.add_argument("--poll", type=float, default=30.0)
    args = parser.parse_args(argv)

    if args.command == "submit":
        extra = args.sbatch_args[1:] if args.sbatch_args[:1] == ["--"] else args.sbatch_args
        return submit(Path.cwd(), args.workdir, extra, args.max_parallel, args.poll,
                      wait=not args.no_wait)
    sweep_dir = args.sweep_dir or latest_sweep(DEFAULT_WORKDIR)
    if args.wait:
        return _follow(sweep_dir, args.poll, print)
    return wait_and_report(sweep_dir, args.poll, print, wait=False)


def _entry() -> None:
    try:
        sys.exit(main())
    except UserError as exc:
        if os.environ.get("QLORA_DIAG_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _entry()
