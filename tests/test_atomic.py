"""Nothing half-written: a writer that fails, is interrupted or killed leaves the previous
complete output in place and, once another writer runs, no temporary files."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qlora_diag.core.atomic import atomic_dir, atomic_file, write_json
from qlora_diag.core.errors import UserError


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def previous(tmp_path: Path) -> Path:
    """A complete earlier output ``out/result`` with two files."""
    out = tmp_path / "out" / "result"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old a")
        (tmp / "b.txt").write_text("old b")
    return out


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def test_success_replaces_the_old_output(tmp_path):
    out = previous(tmp_path)
    with atomic_dir(out) as tmp:
        assert not (out / "c.txt").exists()
        (tmp / "c.txt").write_text("new c")
        assert (out / "a.txt").read_text() == "old a", "readers see the old output meanwhile"
    assert sorted(snapshot(out)) == ["c.txt"], "old files do not linger in the new output"
    assert siblings(out) == ["result"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, "not left private like a temp dir"


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_old_output(tmp_path, error):
    out = previous(tmp_path)
    before = snapshot(out)
    with pytest.raises(type(error)):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise error
    assert snapshot(out) == before
    assert siblings(out) == ["result"], "the temporary directory is removed"


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_atomic_file_failure_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "metrics.json"
    write_json(path, {"eval_loss": 1.0})
    with pytest.raises(type(error)):
        with atomic_file(path) as fh:
            fh.write('{"eval_lo')
            raise error
    assert path.read_text() == '{\n  "eval_loss": 1.0\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "not left 0600 like a mkstemp file"


def test_failing_save_pretrained_keeps_the_previous_base(tmp_path, tiny_base_dir, monkeypatch):
    """The `base` stage's save fails after one file (disk full): models/base stays the previous
    complete model, which still loads."""
    import transformers

    from qlora_diag.models.loading import load_base, materialize_base

    out = tmp_path / "models" / "base"
    shutil.copytree(tiny_base_dir, out)
    before = snapshot(out)

    def save_one_file_then_fail(self, save_directory, *args, **kwargs):
        self.config.save_pretrained(save_directory)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_one_file_then_fail)
    with pytest.raises(OSError, match="No space left"):
        materialize_base(str(tiny_base_dir), out, dtype="bfloat16")
    monkeypatch.undo()
    assert snapshot(out) == before
    assert siblings(out) == ["base"]
    load_base(out, "bfloat16")


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qlora_diag.core.atomic import atomic_dir
    from qlora_diag.core.cli import run_stage

    def main():
        with atomic_dir(sys.argv[1]) as tmp:
            (tmp / "a.txt").write_text("half")
            Path(sys.argv[2]).write_text("writing")
            time.sleep(60)

    run_stage(main)
""")


def start_writer(out: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(marker)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "writer did not start"
        time.sleep(0.05)
    return proc, marker


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_interrupted_stage_keeps_the_old_output_and_cleans_up(tmp_path, sig, code):
    """Ctrl-C, or the SIGTERM of a preempted host or `dvc queue kill`: the stage exits 130 with a
    hint, the old output is intact and no temporary directory is left."""
    out = previous(tmp_path)
    before = snapshot(out)
    proc, _ = start_writer(out, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert "interrupted: completed outputs and checkpoints are kept" in err
    assert "Traceback" not in err
    assert snapshot(out) == before
    assert siblings(out) == ["result"]


@pytest.mark.parametrize("stage", ["base", "prepare", "quantize", "train", "compare", "plot", "bench"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_while_a_stage_loads_exits_130_without_traceback(tmp_path, stage, sig):
    """Ctrl-C or SIGTERM while a stage script still imports torch and transformers (its first
    seconds) is the same clean exit 130 as later, not a KeyboardInterrupt traceback and exit 1
    (found by interruptions::test_stage_stopped_midway_reruns_to_the_uninterrupted_result)."""
    script = Path(__file__).resolve().parents[1] / "stages" / f"{stage}.py"
    proc = subprocess.Popen([sys.executable, "-X", "importtime", str(script)], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    # -X importtime logs each import as it completes: signal at the first import completed
    # after qlora_diag.core.cli's (the script's first statement), with torch still to come.
    log = []
    while not any("qlora_diag.core.cli" in line for line in log[:-1]):
        log.append(proc.stderr.readline())
        assert log[-1], "".join(log)[-2000:]
    proc.send_signal(sig)
    err = "".join(log) + proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err[-2000:]
    assert "interrupted: completed outputs and checkpoints are kept" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]


def test_killed_writer_leftovers_are_swept_by_the_next_writer(tmp_path):
    """SIGKILL skips every cleanup: the temporary directory stays, the old output is intact,
    and the next write of the same output removes the leftover."""
    out = previous(tmp_path)
    before = snapshot(out)
    proc, _ = start_writer(out, tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    leftovers = [n for n in siblings(out) if n != "result"]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".result.tmp-{proc.pid}-")
    assert snapshot(out) == before

    live = out.parent / f".result.tmp-{os.getpid()}-busy"  # a writer that is still running
    live.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new a")
    assert siblings(out) == [live.name, "result"]
    assert snapshot(out) == {"a.txt": hashlib.sha256(b"new a").hexdigest()}


def test_output_moved_aside_by_a_killed_writer_is_restored(tmp_path):
    """A kill between moving the old output aside and moving the new one in leaves no output;
    the next writer puts the old one back before it starts."""
    out = previous(tmp_path)
    before = snapshot(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    os.replace(out, out.parent / f".result.old-{int(dead.stdout)}")
    with pytest.raises(UserError):
        with atomic_dir(out):
            assert snapshot(out) == before
            raise UserError("the new write fails too")
    assert snapshot(out) == before
    assert siblings(out) == ["result"]
