"""Writing outputs so that a crash never leaves a half-written file: every write goes to a temporary file next to
the target, is fsynced and renamed over it. Standard library only (the GPU check imports it without torch).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import IO, Any

from ..errors import UserError

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def temporary_path(path: str | os.PathLike) -> str:
    """Where :func:`replace_atomically` writes before renaming: a hidden file beside ``path``, named by the pid."""
    path = os.fspath(path)
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")


def replace_atomically(path: str | os.PathLike, write: Callable[[IO], Any], binary: bool) -> None:
    """Calls ``write(handle)`` on a temporary file beside ``path``, fsyncs it and renames it over ``path``; the
    temporary file is removed whatever happens."""
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, os.fspath(path))
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_atomic_or_explain(path: str | os.PathLike, write: Callable[[IO[bytes]], Any],
                            needed_bytes: Callable[[], int]) -> None:
    """:func:`replace_atomically` in binary; a failed write is a one-line :class:`UserError` that says what to do."""
    try:
        replace_atomically(path, write, binary=True)
    except OSError as error:
        reason = write_failure_message(path, error, needed_bytes=needed_bytes)
        raise UserError(f"{reason}; nothing was written, any previous {os.path.basename(os.fspath(path))} is "
                        f"unchanged: free space or fix the folder, then run the same command again") from None


class WriteSink:
    """A file-like target (e.g. for ``torch.save``) that counts the bytes written, passes them on to ``handle``
    (if any) and keeps the ``OSError`` of the first write that fails, for callers whose writer reports it as
    something else (torch.save raises a RuntimeError)."""

    def __init__(self, handle: IO | None = None) -> None:
        self.handle, self.size = handle, 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.handle is None:
            return len(data)
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.flush()


def write_failure_message(path: str | os.PathLike, error: OSError, needed_bytes: Callable[[], int] | None = None
                          ) -> str:
    """Why ``path`` could not be written, in one line naming its folder: a full disk (with the space
    ``needed_bytes()`` asks for against the space free), a folder deleted or made read-only, or else the error."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(os.fspath(path))
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f"{_megabytes(needed_bytes())} needed, " if needed_bytes is not None else ""
        try:
            free = f"{_megabytes(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "free space unknown"
        return f"no space left in {folder} to write {name} ({needed}{free})"
    if not os.path.isdir(folder):
        return f"the output folder {folder} was deleted while {name} was being written"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the output folder {folder} is not writable any more ({error.strerror}) while writing {name}"
    return f"cannot write {name} in {folder}: {error.strerror or error}"


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    replace_atomically(path, lambda handle: handle.write(text), binary=False)


def write_json_atomic(payload: Any, path: str | os.PathLike) -> None:
    """``payload`` as indented JSON, written atomically."""
    write_text_atomic(json.dumps(payload, indent=1) + "\n", path)


def append_json_line(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """One JSON line appended to ``path`` (the reference's ``log.txt`` format: one line per epoch)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(dict(record)) + "\n")


def read_json_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file such as ``log.txt``; an absent file has none."""
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Deletes the temporary files of :func:`replace_atomically` that a process killed mid-write left behind
    (their writer is no longer running); returns their names. Nothing ever reads them: they only waste space."""
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.match(name)
        if match and (int(match.group(1)) == os.getpid() or not _process_exists(int(match.group(1)))):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
