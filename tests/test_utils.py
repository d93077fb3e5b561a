"""benchmarks.processes and benchmarks.machine (the tests', benchmarks', experiments' and GPU check's helpers):
process control (a killed tree leaves no survivor, every wait has a deadline) and machine facts (what is known
without torch is found without importing it)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from benchmarks import machine
from benchmarks.processes import (
    children,
    descendants,
    free_port,
    is_running,
    kill_tree,
    run_with_timeout,
    start_session,
    stream_output,
    supervised,
    wait_for_exit,
    wait_until,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sleeper_tag() -> str:
    """A ``sleep`` duration no other process uses, so that the sleeps a test starts can be found wherever they
    were reparented to."""
    return f"300.{uuid.uuid4().int % 10**9:09d}"


def running_with(argument: str) -> list[int]:
    """Live processes whose command line holds ``argument``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    arguments = handle.read().split(b"\0")
            except OSError:
                continue
            if argument.encode() in arguments and is_running(int(entry)):
                found.append(int(entry))
    return found


def test_kill_tree_leaves_no_survivor_in_the_group_in_other_sessions_or_below():
    tag = sleeper_tag()
    # One sleep in the command's group, one in a session of its own (as torchrun starts its workers), one two
    # levels down, and a shell that keeps starting more while it is being killed.
    script = (f"sleep {tag} & setsid sleep {tag} & (sleep {tag} & wait) & "
              f"(while true; do sleep {tag} & sleep 0.01; done) & wait")
    process = start_session(["bash", "-c", script])
    wait_until(lambda: len(running_with(tag)) >= 6, timeout=30, process=process)
    assert set(running_with(tag)) <= set(descendants(process.pid))
    kill_tree(process)
    assert process.returncode is not None
    time.sleep(0.2)  # nothing may appear after the kill either
    assert running_with(tag) == []


def test_kill_tree_of_a_bare_pid_kills_its_tree_only():
    tag = sleeper_tag()
    # In this test's own process group: the group must not be signalled, or the test would die with it.
    process = subprocess.Popen(["bash", "-c", f"sleep {tag} & wait"])
    try:
        wait_until(lambda: running_with(tag), timeout=30, process=process)
        assert children(process.pid) == running_with(tag)
        kill_tree(process.pid)
        assert process.wait(timeout=10) != 0
        assert running_with(tag) == []
    finally:
        process.kill()
        process.wait()


def test_supervised_kills_what_the_block_left_running():
    tag = sleeper_tag()
    with supervised(["bash", "-c", f"sleep {tag} & wait"]) as process:
        wait_until(lambda: running_with(tag), timeout=30, process=process)
    assert process.returncode is not None and running_with(tag) == []


def test_run_with_timeout_returns_the_output_and_kills_what_the_command_left_behind():
    tag = sleeper_tag()
    completed = run_with_timeout(["bash", "-c", f"sleep {tag} >/dev/null 2>&1 & echo done"], timeout=30)
    assert completed.returncode == 0 and completed.stdout == "done\n"
    assert running_with(tag) == []


def test_run_with_timeout_kills_the_whole_tree_on_timeout_and_keeps_the_output_so_far():
    tag = sleeper_tag()
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        run_with_timeout(["bash", "-c", f"echo started; setsid sleep {tag} & sleep {tag}"], timeout=2)
    assert time.monotonic() - started < 20
    assert raised.value.output == "started\n"
    assert running_with(tag) == []


def test_stream_output_hands_over_lines_as_written_and_kills_the_whole_tree():
    tag = sleeper_tag()
    seen = []
    started = time.monotonic()
    returncode, lines = stream_output(["bash", "-c", f"echo one; setsid sleep {tag} & sleep {tag}"], 2, seen.append)
    assert returncode is None and lines == seen == ["one"] and time.monotonic() - started < 20
    assert running_with(tag) == []
    # Exited, while a process it left behind holds the output pipe open: its status, and that process killed.
    returncode, lines = stream_output(["bash", "-c", f"echo two; sleep {tag} & exit 3"], 60, seen.append)
    assert returncode == 3 and lines == ["two"] and running_with(tag) == []


def test_wait_for_exit_polls_and_gives_up_at_its_deadline():
    with supervised([sys.executable, "-c", "import time; time.sleep(300)"]) as process:
        polls = []
        started = time.monotonic()
        assert wait_for_exit(process, timeout=0.5, poll=lambda: polls.append(1)) is None
        assert 0.5 <= time.monotonic() - started < 5 and polls and process.poll() is None
    with supervised([sys.executable, "-c", "raise SystemExit(7)"]) as process:
        assert wait_for_exit(process, timeout=60) == 7


def test_wait_until_fails_at_its_deadline_or_when_the_process_ends_first():
    with pytest.raises(TimeoutError, match="within 0.1 s"):
        wait_until(lambda: False, timeout=0.1)
    with supervised([sys.executable, "-c", "pass"]) as process:
        with pytest.raises(RuntimeError, match="ended"):
            wait_until(lambda: False, timeout=60, process=process)


def test_free_port_can_be_bound():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_machine_facts_without_torch_import_no_torch():
    code = ("import json, sys; from benchmarks import machine, processes; from dino_sparo.utils import files; "
            "info = machine.host_description(); print(json.dumps(info)); print('torch' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert completed.returncode == 0, completed.stderr
    info_line, torch_imported = completed.stdout.strip().splitlines()
    assert torch_imported == "False"
    assert set(machine.host_description()) == set(json.loads(info_line))


def test_machine_description():
    info = machine.describe_machine()
    assert 1 <= info["usable_cores"] <= info["cpu_cores"] == os.cpu_count()
    assert info["cpu"] and info["torch"] and info["threads"] >= 1 and isinstance(info["cpu_fast_bf16"], bool)
    assert info["shm_gib"] is None or info["shm_gib"] > 0
    if info["cuda_available"]:
        assert {"gpu", "bf16_native", "matmul_allow_tf32", "cudnn_allow_tf32", "sdpa_chosen_bf16"} <= set(info)
    assert info["cpu"] in machine.summary_line(info)


def test_c_compiler_is_none_without_one(monkeypatch):
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    assert machine.c_compiler() is None
    assert machine.package_version("surely-not-an-installed-distribution") is None
