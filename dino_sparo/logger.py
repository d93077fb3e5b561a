"""The package's one logging set-up: messages of the ``dino_sparo.*`` loggers go to stdout, warnings and errors to
stderr, from the main process only (as DINO's ``setup_for_distributed`` and DINOv2's and timm's logging do). A
record logged with ``extra={"all_ranks": True}`` is printed by every process."""
from __future__ import annotations

import logging
import sys

PACKAGE_LOGGER = "dino_sparo"


class _CurrentStream(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` (or ``sys.stderr``) is when a record comes, so redirections made after
    the set-up (pytest's capture, ``contextlib.redirect_stdout``) see the messages."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property
    def stream(self):  # noqa: ANN201 - a text stream
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # set by StreamHandler.__init__; the stream is looked up at each record
        pass


class _OnRank(logging.Filter):
    def __init__(self, rank: int, below: int | None = None) -> None:
        super().__init__()
        self.rank, self.below = rank, below

    def filter(self, record: logging.LogRecord) -> bool:
        if self.below is not None and record.levelno >= self.below:
            return False
        return self.rank == 0 or getattr(record, "all_ranks", False)


def setup_logging(rank: int = 0) -> None:
    """(Re)configures the package's logger for the process of ``rank``; every entry point calls it first."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    out, err = _CurrentStream("stdout"), _CurrentStream("stderr")
    out.addFilter(_OnRank(rank, below=logging.WARNING))
    err.setLevel(logging.WARNING)
    err.addFilter(_OnRank(rank))
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
