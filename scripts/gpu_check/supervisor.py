"""Runs the check's commands: each in a session of its own, within its time limit, what is left of its part's and
of the check's, its output in a log, and everything it started killed when it ends; the report is rewritten after
every command and whenever a watched command produced something new."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Container, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.machine import usable_cores
from benchmarks.processes import kill_tree, start_session, wait_for_exit

from .plan import Plan
from .report import Part, Step, overall_result, tail, write_report

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MIN_STEP_S = 5.0  # a command given less time than this is not started: it could not prove anything

# Called between two looks at a running command with the process and its log; True when it changed its part, so
# that the report is rewritten at once.
Watch = Callable[[subprocess.Popen, Path], bool]


def subprocess_environment(hide_cuda: bool, cache_dir: Path | None = None) -> dict[str, str]:
    """The commands' environment: the repository and this package importable, no launcher variables, and with
    ``cache_dir`` torch.compile's caches there, so that each check compiles from scratch and leaves nothing
    behind (TMPDIR itself is kept: a longer one can exceed the length of a Unix socket's path)."""
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    if cache_dir is not None:
        env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir / "inductor"), TRITON_CACHE_DIR=str(cache_dir / "triton"))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(SCRIPTS), os.environ.get("PYTHONPATH")]))
    # The data loaders get processes of their own; more math threads per process would only contend for cores
    # (on the CPU, with tiny models, one thread is the fastest: OpenMP threads spin-wait on busy cores).
    env["OMP_NUM_THREADS"] = "1" if hide_cuda else str(min(4, usable_cores()))
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run takes the CPU paths even on a GPU machine
    return env


def module_command(module: str, *args: Any) -> list[str]:
    """``python -m gpu_check.<module> ARGS``: the helpers that need torch, which this process never imports."""
    return [sys.executable, "-m", f"gpu_check.{module}", *map(str, args)]


class Check:
    """One run of the check: its parts, its time budget, its commands and its report.

    Budget: every command ends by ``total_limit_s - compile_reserve_s`` except the ``reserved`` one (torch.compile,
    last), which may run to ``total_limit_s``; within that, each part ends by its own limit.
    """

    def __init__(self, report_dir: Path, work_dir: Path, plan: Plan, parts: list[Part], command: str) -> None:
        self.report_dir, self.work_dir, self.plan, self.parts, self.command = report_dir, work_dir, plan, parts, command
        self.logs_dir = report_dir / "logs"
        self.started_at = datetime.now(timezone.utc)
        self.started = time.monotonic()
        self.deadline = self.started + plan.total_limit_s
        self.regular_deadline = self.deadline - plan.compile_reserve_s
        self.part_deadline = self.regular_deadline
        self.env = subprocess_environment(hide_cuda=plan.device == "cpu", cache_dir=work_dir / "caches")

    @property
    def dry_run(self) -> bool:
        return self.plan.device == "cpu"

    def run_part(self, part: Part, body: Callable[[Check, Part], None]) -> None:
        print(f"[{part.number}/{len(self.parts)}] {part.title} ...", flush=True)
        start = time.monotonic()
        self.part_deadline = min(start + part.limit_s - part.reserved_s, self.deadline)
        try:
            # A part holding a reserved command may start as long as the reserve is left.
            latest_end = self.deadline if part.reserved_s else min(self.part_deadline, self.regular_deadline)
            if latest_end - start < MIN_STEP_S:
                part.status = "skipped"
                part.problems.append("not run: the whole check's time limit was reached")
            else:
                part.status = "running"
                self.write_report()
                try:
                    body(self, part)
                except Exception as error:  # a surprise in some output must not cost the parts after this one
                    part.problems.append(f"the check itself failed here: {type(error).__name__}: {error}")
                part.status = part.settle()
        finally:  # also when the check is interrupted
            part.seconds = time.monotonic() - start
        self.write_report()
        print(f"    {part.status} in {part.seconds:.1f} s" + (f": {part.headline}" if part.headline else ""),
              flush=True)

    def step(self, part: Part, name: str, command: Sequence[Any], limit_s: float, *, watch: Watch | None = None,
             ok_returncodes: Container[int] = (0,), reserved: bool = False) -> Step:
        """Runs ``command`` from the repository root, output to logs/<part>_<name>.log, within ``limit_s`` and
        what is left of the part and the check (``reserved``: of the whole check only, its running over the
        limit being information rather than a failure); whatever it started is killed when it ends."""
        log_path = self.logs_dir / f"{part.number}_{name}.log"
        now = time.monotonic()
        timeout = min(limit_s, self.deadline - now) if reserved else \
            min(limit_s, self.part_deadline - now, self.regular_deadline - now)
        if timeout < MIN_STEP_S:
            step = Step(name, "skipped", 0.0, None, log="", informational=reserved)
            (part.notes if reserved else part.problems).append(f"{name}: not run, the time limit was reached")
        else:
            step = self._run(part, name, [str(arg) for arg in command], log_path, timeout, watch, ok_returncodes,
                             reserved)
        part.steps.append(step)
        if step.output and all(earlier.ok for earlier in part.steps[:-1]):
            # The tail shown is that of the first command that did not pass, else of the last one.
            part.log_tail = tail(step.output)
        self.write_report()
        return step

    def _run(self, part: Part, name: str, command: list[str], log_path: Path, timeout: float, watch: Watch | None,
             ok_returncodes: Container[int], informational: bool) -> Step:
        start = time.monotonic()
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            process = start_session(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
            def poll() -> None:
                if watch is not None and watch(process, log_path):
                    self.write_report()

            try:
                returncode = wait_for_exit(process, timeout, poll)
            finally:
                kill_tree(process)
        poll()  # what it wrote just before it ended
        seconds = time.monotonic() - start
        output = log_path.read_text(errors="replace")
        if returncode is None:
            status = "timeout"
            message = f"{name}: killed after its time limit of {timeout:.0f} s"
            (part.notes if informational else part.problems).append(
                message + (" (information, not a failure)" if informational else ""))
        else:
            status = "pass" if returncode in ok_returncodes else "fail"
        return Step(name, status, seconds, returncode, str(log_path.relative_to(self.report_dir)), output,
                    informational)

    def payload(self) -> dict[str, Any]:
        return {"mode": self.plan.mode, "command": self.command,
                "started": self.started_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
                "elapsed_s": round(time.monotonic() - self.started, 1), "time_limit_s": self.plan.total_limit_s,
                "result": overall_result(self.parts), "notes": list(self.plan.notes),
                "parts": [part.to_json() for part in self.parts]}

    def write_report(self) -> None:
        write_report(self.report_dir, self.payload())


def signal_once_logged(text: str, signum: int = signal.SIGTERM) -> Watch:
    """Sends ``signum`` to the command's own process (not its group: as a scheduler preempting a job signals the
    launcher) once ``text`` appears in its log."""
    state = {"sent": False, "size": -1}

    def watch(process: subprocess.Popen, log_path: Path) -> bool:
        size = log_path.stat().st_size
        if not state["sent"] and size != state["size"] and process.poll() is None:
            state["size"] = size
            if text in log_path.read_text(errors="replace"):
                process.send_signal(signum)
                state["sent"] = True
        return False

    return watch
