"""Entry-point wrapper for stage scripts: clear errors, exit codes, thread setup."""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from qlora_diag.core.errors import UserError
from qlora_diag.core.logs import quiet_known_library_noise

DEBUG_ENV = "QLORA_DIAG_DEBUG"


INTERRUPTED = "interrupted: completed outputs and checkpoints are kept; run `dvc repro` to resume."


def _exit_while_loading(signum, frame):
    # Nothing is written while a stage script loads its imports, so it may stop at once.
    print(INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)


def exit_quietly_while_loading() -> None:
    """Call first in a stage script, before its imports (torch, transformers: seconds): Ctrl-C or
    SIGTERM while they load exits 130 with the one-line message instead of a KeyboardInterrupt
    traceback and exit 1. :func:`run_stage` then installs the handlers that let writes clean up.
    Also silences the known-harmless library messages before those imports print them."""
    quiet_known_library_noise()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # e.g. a job started with `&`
        signal.signal(signal.SIGINT, _exit_while_loading)
    signal.signal(signal.SIGTERM, _exit_while_loading)


def _terminate(signum, frame):
    # A preempted host or `dvc queue kill` sends SIGTERM, whose default action skips every
    # cleanup; raising here runs the same path as Ctrl-C, so temporary outputs are removed.
    raise KeyboardInterrupt


def run_stage(main: Callable[[], None], check_lock: bool = True) -> None:
    """Run ``main``; print a :class:`UserError` as one paragraph and exit 2.

    Set ``QLORA_DIAG_DEBUG=1`` to get the full traceback instead. Ctrl-C and SIGTERM exit with
    130 after the interrupted writes have cleaned up. With ``check_lock`` a ``dvc.lock`` emptied
    by a kill is reported before any work, and under `dvc repro` the lock is saved as the last
    good copy (:func:`qlora_diag.core.lockfile.at_stage_start`).
    """
    quiet_known_library_noise()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if check_lock:
            from qlora_diag.core.lockfile import at_stage_start

            at_stage_start()
        main()
    except UserError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
