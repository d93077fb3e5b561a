"""Running commands (for the tests, the benchmarks, the experiments and the GPU check) that can neither hang nor
outlive their caller: each one in a session of its own, every wait with a deadline, and at the end the whole tree
of processes it started killed, not only its process group (torchrun starts each worker in a session of its own).
Linux only (the process tree is read from /proc). Standard library only: the GPU check imports this without torch.
"""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

POLL_S = 0.05
FREEZE_WAIT_S = 1.0  # how long a stopped process may take to show as stopped (one in uninterruptible sleep)
ORPHAN_OUTPUT_S = 1.0  # how long the output of a command that has exited is read on while its pipe stays open
KILL_WAIT_S = 10.0  # how long a killed process may take to die (a GPU context can take seconds to tear down)

Command = Sequence[Any]  # program and arguments, each turned into a string (paths and numbers too)
Stream = int | IO[Any] | None


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state letter, process group) of ``pid`` from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[2])


def _parent_and_state(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of ``pid`` from /proc, None when it is gone."""
    found = _stat(pid)
    return None if found is None else found[:2]


def _group_members(group: int) -> list[int]:
    """The live (not zombie) processes of process group ``group``."""
    members = []
    for entry in os.listdir("/proc"):
        found = _stat(int(entry)) if entry.isdigit() else None
        if found is not None and found[2] == group and found[1] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _parent_and_state(int(entry))) is not None:
            parents[int(entry)] = found[0]
    return parents


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, sorted."""
    return sorted(child for child, parent in _parents().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...); empty when there is none."""
    below: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        below.setdefault(parent, []).append(child)
    found, queue = [], [pid]
    while queue:
        for child in below.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a dead process its parent has not reaped)."""
    found = _parent_and_state(pid)
    return found is not None and found[1] not in ("Z", "X")


def _stopped_or_gone(pid: int) -> bool:
    found = _parent_and_state(pid)
    return found is None or found[1] in ("T", "t", "Z", "X")


def _send(pid: int, signum: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signum)


def _freeze(root: int) -> list[int]:
    """``root`` and every process below it, stopped with SIGSTOP. A stopped process cannot fork, so the tree is
    scanned again until a scan finds no new process; a process may finish a fork it had begun before it stops,
    hence the wait until each one shows as stopped before the next scan."""
    frozen: list[int] = []
    fresh = [root]
    while fresh:
        for pid in fresh:
            _send(pid, signal.SIGSTOP)
        frozen += fresh
        deadline = time.monotonic() + FREEZE_WAIT_S
        while not all(_stopped_or_gone(pid) for pid in fresh) and time.monotonic() < deadline:
            time.sleep(0.001)
        fresh = [pid for pid in descendants(root) if pid not in frozen]
    return frozen


def kill_tree(target: subprocess.Popen | int) -> None:
    """SIGKILL to a process and everything below it, leaving no survivor.

    ``target``: a ``Popen`` started in a session of its own (:func:`start_session`), whose process group is killed
    too (it holds any descendant already orphaned) and which is then reaped; or a bare pid (a process that does
    not lead its own group, e.g. one some library started), whose tree alone is killed.
    """
    pid = target.pid if isinstance(target, subprocess.Popen) else target
    # A reaped process's pid may belong to another process by now: only its group (which keeps the number
    # reserved while any member lives) may still be signalled.
    alive = target.poll() is None if isinstance(target, subprocess.Popen) else True
    members = _freeze(pid) if alive else []
    for member in members:
        _send(member, signal.SIGKILL)
    if isinstance(target, subprocess.Popen):
        _send(pid, signal.SIGKILL, group=True)
        target.wait()
    # A signal is delivered after kill() returns: wait until the processes are gone (the tree's, and the orphans
    # left in the group by a command that has already ended), so that what they held (GPU memory, ports, files)
    # is free when this returns.
    def any_left() -> bool:
        if any(is_running(member) for member in members):
            return True
        return isinstance(target, subprocess.Popen) and bool(_group_members(pid))

    deadline = time.monotonic() + KILL_WAIT_S
    while any_left() and time.monotonic() < deadline:
        time.sleep(0.001)


def start_session(command: Command, *, cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  stdin: Stream = subprocess.DEVNULL, stdout: Stream = None, stderr: Stream = None,
                  text: bool = False) -> subprocess.Popen:
    """``command`` started in a new session (so that it leads its own process group), stdin closed by default."""
    return subprocess.Popen([str(arg) for arg in command], cwd=cwd, env=None if env is None else dict(env),
                            stdin=stdin, stdout=stdout, stderr=stderr, text=text, start_new_session=True)


@contextlib.contextmanager
def supervised(command: Command, **options: Any) -> Iterator[subprocess.Popen]:
    """:func:`start_session` for the duration of a ``with`` block; the whole tree is killed on leaving it,
    whatever happened."""
    process = start_session(command, **options)
    try:
        yield process
    finally:
        kill_tree(process)


def wait_for_exit(process: subprocess.Popen, timeout: float, poll: Callable[[], None] | None = None,
                  interval: float = POLL_S) -> int | None:
    """The exit status of ``process``, or None when ``timeout`` seconds pass first (the process is left running).
    ``poll``, when given, is called between two looks (to watch the process's output, signal it, ...)."""
    deadline = time.monotonic() + timeout
    while (returncode := process.poll()) is None:
        if time.monotonic() >= deadline:
            return None
        if poll is not None:
            poll()
        time.sleep(interval)
    return returncode


def run_with_timeout(command: Command, timeout: float, *, cwd: str | os.PathLike | None = None,
                     env: Mapping[str, str] | None = None, input: str | None = None
                     ) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, but in a session of its
    own, and on time-out everything it started is killed, not only the command, before ``TimeoutExpired``
    (carrying the output so far) is raised; what it left running is killed in any case on return."""
    process = start_session(command, cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None else
                            subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(process.args, timeout, output=stdout, stderr=stderr) from None
    finally:
        kill_tree(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def stream_output(command: Command, timeout: float, on_line: Callable[[str], None], *,
                  cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
                  ) -> tuple[int | None, list[str]]:
    """Runs ``command`` in a session of its own and hands each line of its output (stdout and stderr merged,
    without the newline) to ``on_line`` as soon as it is written, so that a command killed midway has shown all
    it printed. Returns (exit status, or None when ``timeout`` seconds passed first; its lines); everything it
    started is killed on return."""
    lines: list[str] = []
    output: queue.Queue[str | None] = queue.Queue()
    with supervised(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True) as process:
        def read() -> None:
            for line in process.stdout:
                output.put(line)
            output.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline, exited_at = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                line = output.get(timeout=POLL_S)
            except queue.Empty:
                if process.poll() is not None:
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > ORPHAN_OUTPUT_S:  # a process it left keeps the pipe open
                        break
                continue
            if line is None:
                break
            lines.append(line.rstrip("\n"))
            on_line(lines[-1])
        try:  # its output has ended, or the time is up: at most what is left of the time for it to exit
            returncode = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            returncode = None
    return returncode, lines


def wait_until(condition: Callable[[], bool], timeout: float, process: subprocess.Popen | None = None,
               interval: float = 0.005) -> None:
    """Polls ``condition`` until it holds; ``TimeoutError`` when ``timeout`` seconds pass first, ``RuntimeError``
    when ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process ended (status {process.returncode}) before the awaited event")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the awaited event did not happen within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
