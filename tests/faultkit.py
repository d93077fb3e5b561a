"""Running the real scripts as subprocesses that can neither hang a test nor outlive it.

Every process is started in its own session (process group) and the whole group is killed when the test is
done with it, so torchrun workers and DataLoader workers go too; every wait has a deadline.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def script(name: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, name)]


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process's whole group (it leads its own session), then reaps it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@contextmanager
def started(command: Sequence[str], env: dict[str, str] | None = None, log_path: str | None = None
            ) -> Iterator[subprocess.Popen]:
    """The command running in its own process group, stdout+stderr to ``log_path`` (a file, so that nothing
    blocks on a full pipe); the group is killed on leaving the block, whatever happened."""
    handle = open(log_path, "w") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env or environment(), stdout=handle,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        kill_group(process)
        if log_path:
            handle.close()


def run(command: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(capture_output=True, text=True)`` but in its own process group, killed as a group
    on timeout (the ``TimeoutExpired`` then fails the test) and in any case on return."""
    process = subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env or environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_until(condition: Callable[[], bool], timeout: float, process: subprocess.Popen | None = None,
               interval: float = 0.005) -> None:
    """Polls ``condition`` until it holds; fails if ``timeout`` passes or ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (status {process.returncode}) before the awaited event")
        if time.monotonic() > deadline:
            raise AssertionError(f"the awaited event did not happen within {timeout} s")
        time.sleep(interval)


def read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL to ``pid`` and all its descendants, for processes that do not lead their own group (as the
    controller of submitit's local executor)."""
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
