"""Entry-point wrapper for stage scripts: clear errors, exit codes, thread setup."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from qlora_diag.errors import UserError

DEBUG_ENV = "QLORA_DIAG_DEBUG"


def _terminate(signum, frame):
    # A preempted host or `dvc queue kill` sends SIGTERM, whose default action skips every
    # cleanup; raising here runs the same path as Ctrl-C, so temporary outputs are removed.
    raise KeyboardInterrupt


def run_stage(main: Callable[[], None]) -> None:
    """Run ``main``; print a :class:`UserError` as one paragraph and exit 2.

    Set ``QLORA_DIAG_DEBUG=1`` to get the full traceback instead. Ctrl-C and SIGTERM exit with
    130 after the interrupted writes have cleaned up.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UserError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed outputs and checkpoints are kept; run `dvc repro` to resume.",
              file=sys.stderr)
        sys.exit(130)
