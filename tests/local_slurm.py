"""A real single-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd
(Debian packages munge, slurmctld, slurmd, slurm-client), started in the foreground from a
private directory and stopped afterwards; nothing under /etc or /run is used or changed.

Its own slurm.conf (found through ``SLURM_CONF``), munge key and socket, state and spool
directories, and free loopback ports keep it apart from any other SLURM on the machine. The node
has 2 CPUs and a job gets 1, so two jobs run at once. ``ProctrackType=proctrack/linuxproc`` and
``TaskPlugin=task/none`` need no cgroup set-up; the daemons run as root (``SlurmUser=root``),
munged as the ``munge`` user it refuses to run without.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
PACKAGES = "munge slurmctld slurmd slurm-client"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None
            and not Path("/usr/sbin", b).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    def __init__(self, cpus: int = 2):
        self.cpus = cpus
        self.dir = Path(tempfile.mkdtemp(prefix="qlora-slurm-"))
        # munged (user munge) must reach its socket through this directory.
        self.dir.chmod(0o711)
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict:
        """Environment additions for the SLURM client commands (sbatch, squeue, ...)."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        host = socket.gethostname()
        munge = self.dir / "munge"
        self.conf.write_text("\n".join([
            "ClusterName=qloratest",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge / 'munge.socket'}",
            f"StateSaveLocation={self.dir / 'state'}",
            f"SlurmdSpoolDir={self.dir / 'spool'}",
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.dir / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.dir / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",  # one CPU per job: two jobs share the node
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # trust CPUs= below whatever the host has
            "MpiDefault=none",
            "KillWait=5",  # seconds from a cancel's SIGTERM to its SIGKILL (default 30)
            "MailProg=/bin/true",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _start_munged(self) -> None:
        munge = self.dir / "munge"
        munge.mkdir(mode=0o711)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        log = open(self.dir / "munged.out", "wb")
        self.procs.append(subprocess.Popen(
            [_exe("munged"), "--foreground", f"--socket={munge / 'munge.socket'}",
             f"--key-file={key}", f"--log-file={munge / 'munged.log'}",
             f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}"],
            user="munge", group="munge", stdout=log, stderr=subprocess.STDOUT))
        self._wait(lambda: (munge / "munge.socket").exists(), "munged to create its socket")

    def start(self) -> LocalSlurm:
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        self._write_config()
        self._start_munged()
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.dir / f"{daemon}.out", "wb")
            self.procs.append(subprocess.Popen([_exe(daemon), "-D", "-f", str(self.conf)],
                                               stdout=log, stderr=subprocess.STDOUT))
        self._wait(self._node_idle, "the node to come up idle")
        return self

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**os.environ, **self.env}, text=True,
                              capture_output=True)

    def _node_idle(self) -> bool:
        proc = self._run("sinfo", "--noheader", "--format=%T")
        return proc.returncode == 0 and proc.stdout.strip() == "idle"

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} while waiting "
                                       f"for {what}; logs:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; logs:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.dir / name
            if path.is_file():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left of the jobs, then stop slurmd, slurmctld and munged."""
        if self._run("scontrol", "ping").returncode == 0:
            self._run("scancel", "--me")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self._run(
                    "squeue", "--me", "--noheader").stdout.strip():
                time.sleep(0.5)
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
