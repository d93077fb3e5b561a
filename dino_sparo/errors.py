"""User-facing failures and the exit statuses the scripts map them to. Imports nothing heavy (no torch, no timm),
so every module can use it.

Exit statuses: 0 done, 1 non-finite loss (or an unexpected error), 2 bad input (flags, data, or an output folder
that cannot be written: full, deleted, read-only) or out of device memory, 3 preempted (state saved: run the same
command again), 4 another process of the job died or stopped responding (run the same command again: it resumes
from the last checkpoint), 130 interrupted by Ctrl-C.
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

EXIT_NONFINITE = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3
EXIT_PEER_LOST = 4
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and iteration."""


class PeerLost(RuntimeError):
    """A collective failed because another process of a multi-process job died, lost its connection or stopped
    responding; the message names the likely cause instead of the backend's traceback."""


class Preempted(Exception):
    """Training stopped on a preemption signal after writing its checkpoint; the same command resumes it."""

    def __init__(self, signum: int | None, epoch: int, iteration: int, checkpoint_path: str) -> None:
        self.signum, self.epoch, self.iteration, self.checkpoint_path = signum, epoch, iteration, checkpoint_path
        cause = f"by {signal.Signals(signum).name}" if signum else "(another process of the job got the signal)"
        super().__init__(f"preempted {cause} at epoch {epoch}, iteration {iteration}: the state was saved to "
                         f"{checkpoint_path}; run the same command again to resume from there")


def run_cli(main: Callable[[], Any]) -> None:
    """Runs a script's ``main``, turning the failures above into one line on stderr and their exit status."""
    try:
        main()
    except UserError as error:
        _fail(f"error: {error}", EXIT_USER_ERROR)
    except NonFiniteLossError as error:
        _fail(f"error: {error}", EXIT_NONFINITE)
    except PeerLost as error:
        _fail(f"error: {error}", EXIT_PEER_LOST)
    except Preempted as stop:
        _fail(f"stopped: {stop}", EXIT_PREEMPTED)
    except KeyboardInterrupt:
        _fail("error: interrupted", EXIT_INTERRUPTED)


def _fail(message: str, status: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)
