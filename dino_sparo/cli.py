"""argparse building blocks the scripts share: boolean and integer flag types, and an early check that an output
folder can be written. Imports nothing heavy (no torch)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import NoReturn

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad command line reported in one line (``error: ...``, exit 2) instead of the
    usage block, which for main_dino.py's flags runs to dozens of lines."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Prints each flag's default after its help, except a default of None: that one is decided later, from other
    flags or the machine, and the help says how."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def bool_flag(value: str | bool) -> bool:
    """argparse type for ``--flag true|false`` (also on/off, yes/no, 1/0); with :data:`BARE_IS_TRUE` the bare
    ``--flag`` means true, as in DINO's ``--use_fp16 true`` and the usual ``--compile``."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in {"true", "on", "yes", "1"}:
        return True
    if lowered in {"false", "off", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# The spellings of facebookresearch/dino and its launchers that users type, each mapped to this project's, in one
# place: flag names (torch.distributed.launch passes --local-rank; DINO's visualize_attention.py takes --image_path)
# and arch names (DINO's deit_* are its ViTs). DINO's --use_fp16 is a flag of its own, resolved into --precision.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {"--local_rank": ("--local-rank",), "--images": ("--image_path",)}
ARCH_ALIASES: dict[str, str] = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}


def flag_names(flag: str) -> tuple[str, ...]:
    """``flag`` and the reference's spellings of it (:data:`FLAG_ALIASES`), for ``add_argument``."""
    return (flag, *FLAG_ALIASES.get(flag, ()))


# add_argument(..., type=bool_flag, **BARE_IS_TRUE): ``--flag`` alone is ``--flag true``.
BARE_IS_TRUE = {"nargs": "?", "const": True, "metavar": "BOOL"}


def _integer_at_least(value: str, minimum: int, what: str = "an integer") -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {number}")
    return number


def positive_int(value: str) -> int:
    """argparse type for an integer >= 1."""
    return _integer_at_least(value, 1)


def non_negative_int(value: str) -> int:
    """argparse type for an integer >= 0."""
    return _integer_at_least(value, 0)


def block_count_or_all(value: str) -> int | str:
    """argparse type for ``--freeze_blocks``: an integer >= 0 or ``all``."""
    return value if value == "all" else _integer_at_least(value, 0, "a number of blocks (or all)")


def slot_list(text: str) -> list[int]:
    """argparse type for ``--slots 3,17,42``: distinct slot indices >= 0, in the order given. Whether they exist
    is checked against the model once it is loaded (:func:`dino_sparo.eval.slots.check_slots`)."""
    try:
        slots = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slot indices such as 3,17,42, got {text!r}") \
            from None
    if not slots:
        raise argparse.ArgumentTypeError("expected at least one slot index")
    if min(slots) < 0:
        raise argparse.ArgumentTypeError(f"expected slot indices >= 0, got {text!r}")
    if len(set(slots)) != len(slots):
        raise argparse.ArgumentTypeError(f"a slot is listed more than once: {text!r}")
    return slots


def ensure_writable_dir(path: str, flag: str = "--output_dir", create: bool = True) -> None:
    """Checks that files can be written into the folder ``path`` (creating it unless ``create`` is false, in
    which case its nearest existing parent is checked), so that a bad output folder is a one-line
    :class:`UserError` before any work starts rather than a traceback after it."""
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
            return
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, "Not a directory")
        if not os.access(existing, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"{flag} {path} cannot be written: {reason}") from None
