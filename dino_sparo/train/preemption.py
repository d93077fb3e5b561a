"""Preemption: the signals a scheduler sends before it stops a job are turned into a request that the
training loop honours between two iterations, so a checkpoint of the current state can be written first.
:meth:`PreemptionGuard.agreed_stop` is the one place that decides when to stop.

Slurm sends SIGTERM on preemption (and ``--signal`` USR1/USR2 before a time limit; submitit uses USR2);
torchrun forwards SIGTERM to its workers. The handler only records the signal: stopping in the middle of an
optimisation step would save an inconsistent state.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from ..distributed import any_rank, is_dist_initialized

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionGuard:
    """Context manager that catches :data:`PREEMPTION_SIGNALS` while training and restores the previous
    handlers afterwards (e.g. submitit's, which the launcher then calls to requeue the job).

    Signal handlers can only be set from the main thread; elsewhere the guard does nothing and the signals
    keep their previous behaviour.
    """

    def __init__(self, log_freq: int = 1) -> None:
        self.log_freq = log_freq
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

    def agreed_stop(self, index: int | None = None) -> bool:
        """Whether every process stops now: after iteration ``index`` of an epoch, or (None) at the end of one.

        One process stops at the first iteration after its signal. Several must agree on the same iteration, and
        agreeing is a collective (a host sync): inside an epoch it happens at ``log_freq`` intervals only, where the
        loop already synchronises, so steps stay free of host syncs; at the end of an epoch always. Every process
        must call this at the same points.
        """
        if not is_dist_initialized():
            return self.requested
        if index is not None and (index + 1) % self.log_freq:
            return False
        return any_rank(self.requested)


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore :data:`PREEMPTION_SIGNALS`. torchrun and Slurm signal the
    whole process group, workers included; a worker that died of it would fail the training process's next
    batch before it could save its state. The training process ends its workers itself when it stops."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
