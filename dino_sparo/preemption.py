"""Preemption: the signals a scheduler sends before it stops a job are turned into a request that the
training loop honours between two iterations, so a checkpoint of the current state can be written first.

Slurm sends SIGTERM on preemption (and ``--signal`` USR1/USR2 before a time limit; submitit uses USR2);
torchrun forwards SIGTERM to its workers. The handler only records the signal: stopping in the middle of an
optimisation step would save an inconsistent state.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionGuard:
    """Context manager that catches :data:`PREEMPTION_SIGNALS` while training and restores the previous
    handlers afterwards (e.g. submitit's, which the launcher then calls to requeue the job).

    Signal handlers can only be set from the main thread; elsewhere the guard does nothing and the signals
    keep their previous behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore :data:`PREEMPTION_SIGNALS`. torchrun and Slurm signal the
    whole process group, workers included; a worker that died of it would fail the training process's next
    batch before it could save its state. The training process ends its workers itself when it stops."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
