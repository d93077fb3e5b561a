"""Runs the check's commands: each in a session of its own, within its time limit, what is left of its part's and
of the check's, its output in a log, and everything it started killed when it ends; the report is rewritten after
every command and whenever a watched command produced something new.

What the check leaves in its report folder is four files, as few as a machine that hands back only a handful of
files allows: ``gpu_report.md``, ``gpu_report.json``, ``console.log`` (what the check printed) and ``logs.tgz``
(every command's log, and the benchmarks' JSON, written in a temporary folder and archived after every command and
every half minute while one runs).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Container, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from benchmarks.machine import usable_cores
from benchmarks.processes import kill_tree, start_session, wait_for_exit
from dino_sparo.utils.files import replace_atomically

from .plan import Plan
from .report import NOT_SELECTED, Part, Step, overall_result, tail, write_report

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MIN_STEP_S = 5.0  # a command given less time than this is not started: it could not prove anything
ARCHIVE_EVERY_S = 30.0  # logs.tgz is brought up to date this often while a command runs
REPORT_FILES = ("gpu_report.md", "gpu_report.json", "console.log", "logs.tgz")

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


def command_interpreter() -> str:
    """The Python of the check's commands: ``PYTHON`` (scripts/gpu_check.sh's choice) when set, else this one."""
    return os.environ.get("PYTHON") or sys.executable


class Check:
    """One run of the check: its parts, its time budget, its commands and its report.

    Budget: the selected parts' caps add up to the window every command ends within, except the ``reserved`` one
    (torch.compile, last), which may run on through the compile reserve; within that, each part ends by its own
    cap, and each command by its own limit.
    """

    def __init__(self, report_dir: Path, work_dir: Path, plan: Plan, parts: list[Part], command: str) -> None:
        self.report_dir, self.work_dir, self.plan, self.parts, self.command = report_dir, work_dir, plan, parts, command
        self.logs_dir = work_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.archived_at = 0.0
        self.python = command_interpreter()
        self.started_at = datetime.now(timezone.utc)
        self.started = time.monotonic()
        selected = tuple(part.key for part in parts if part.status != NOT_SELECTED)
        self.time_limit_s = plan.total_limit_s(selected)
        self.deadline = self.started + self.time_limit_s
        self.regular_deadline = self.deadline - (plan.compile_reserve_s if "throughput" in selected else 0.0)
        self.part_deadline = self.regular_deadline
        self.env = subprocess_environment(hide_cuda=plan.device == "cpu", cache_dir=work_dir / "caches")

    @property
    def dry_run(self) -> bool:
        return self.plan.device == "cpu"

    def limit(self, part: Part, name: str) -> float:
        """The own time limit of command ``name`` of ``part``."""
        return self.plan.step_limits_s[part.key][name]

    def module_command(self, module: str, *args: Any) -> list[str]:
        """``python -m gpu_check.<module> ARGS``: the helpers that need torch, which this process never imports."""
        return [self.python, "-m", f"gpu_check.{module}", *map(str, args)]

    def say(self, text: str) -> None:
        """Prints ``text`` and appends it to console.log."""
        print(text, flush=True)
        with open(self.report_dir / "console.log", "a") as console:
            console.write(text + "\n")

    def archive_logs(self) -> None:
        """logs.tgz replaced atomically by an archive of every log so far (as ``logs/...``)."""
        def write(handle: IO[bytes]) -> None:
            with tarfile.open(fileobj=handle, mode="w:gz") as archive:
                archive.add(self.logs_dir, arcname="logs")

        replace_atomically(self.report_dir / "logs.tgz", write, binary=True)
        self.archived_at = time.monotonic()

    def run_part(self, part: Part, body: Callable[[Check, Part], None]) -> None:
        if part.status == NOT_SELECTED:
            return
        self.say(f"[{part.number}/{len(self.parts)}] {part.title} ...")
        start = time.monotonic()
        self.part_deadline = min(start + part.limit_s - part.reserved_s, self.deadline)
        if part.reserved_s:  # its last command may use the reserve and whatever the earlier parts left
            part.limit_s = round(max(part.limit_s, self.deadline - start))
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
        self.say(f"    {part.status} in {part.seconds:.1f} s" + (f": {part.headline}" if part.headline else ""))

    def step(self, part: Part, name: str, command: Sequence[Any], limit_s: float, *, watch: Watch | None = None,
             ok_returncodes: Container[int] = (0,), reserved: bool = False, env: Mapping[str, str] | None = None
             ) -> Step:
        """Runs ``command`` from the repository root with ``env`` added to the commands' environment, output to
        logs/<part>_<name>.log, within ``limit_s`` and what is left of the part and the check (``reserved``: of
        the whole check only, its running over the limit being information rather than a failure); whatever it
        started is killed when it ends."""
        log_path = self.logs_dir / f"{part.number}_{name}.log"
        now = time.monotonic()
        timeout = min(limit_s, self.deadline - now) if reserved else \
            min(limit_s, self.part_deadline - now, self.regular_deadline - now)
        if timeout < MIN_STEP_S:
            step = Step(name, "skipped", 0.0, None, log="", informational=reserved)
            (part.notes if reserved else part.problems).append(f"{name}: not run, the time limit was reached")
        else:
            step = self._run(name, [str(arg) for arg in command], log_path, timeout, watch, ok_returncodes,
                             reserved, {**self.env, **(env or {})})
            (part.notes if reserved else part.problems).extend(step_problems(step, timeout))
        part.steps.append(step)
        if step.output and all(earlier.ok for earlier in part.steps[:-1]):
            # The tail shown is that of the first command that did not pass, else of the last one.
            part.log_tail = tail(step.output)
        self.write_report()
        self.archive_logs()
        return step

    def _run(self, name: str, command: list[str], log_path: Path, timeout: float, watch: Watch | None,
             ok_returncodes: Container[int], informational: bool, env: Mapping[str, str]) -> Step:
        start = time.monotonic()
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            process = start_session(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            def poll() -> None:
                if watch is not None and watch(process, log_path):
                    self.write_report()
                if time.monotonic() - self.archived_at > ARCHIVE_EVERY_S:
                    self.archive_logs()

            try:
                returncode = wait_for_exit(process, timeout, poll)
            finally:
                kill_tree(process)
        poll()  # what it wrote just before it ended
        seconds = time.monotonic() - start
        output = log_path.read_text(errors="replace")
        if returncode is None:
            status = "timeout"
        else:
            status = "pass" if returncode in ok_returncodes else "fail"
        return Step(name, status, seconds, returncode, str(log_path.relative_to(self.work_dir)), output,
                    informational)

    def payload(self) -> dict[str, Any]:
        return {"mode": self.plan.mode, "command": self.command,
                "started": self.started_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
                "elapsed_s": round(time.monotonic() - self.started, 1), "time_limit_s": self.time_limit_s,
                "result": overall_result(self.parts), "notes": list(self.plan.notes),
                "parts": [part.to_json() for part in self.parts]}

    def write_report(self) -> None:
        write_report(self.report_dir, self.payload())


def step_problems(step: Step, timeout: float) -> list[str]:
    """What a command that ran over its limit adds to its part's problems (or, when informational, notes)."""
    if step.status != "timeout":
        return []
    return [f"{step.name}: killed after its time limit of {timeout:.0f} s"
            + (" (information, not a failure)" if step.informational else "")]


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
