"""GPU acceptance check: every CUDA path of dino_sparo exercised by one command, with a report of what it measured.

    bash scripts/gpu_check.sh [--dry-run] [REPORT_DIR]     # from the repository root; REPORT_DIR: gpu_report/

Parts, each with its own time limit, and the whole check bounded too (under 6 minutes on one H100/H200):
  1. environment   the GPU and its memory, torch / CUDA / cuDNN / NCCL versions, native bf16, compute capability
  2. CUDA tests    ``pytest -m cuda``
  3. end to end    torchrun pretraining in bf16 (NCCL), stopped by SIGTERM mid-epoch and resumed; fp16 with a
                   GradScaler; k-NN and linear probe on GPU features; slot and head attention maps
  4. throughput    the training step (reference-style baseline against ours, CLS and SPARO, torch.compile) and
                   the multi-worker data loader, and whether the loader keeps up with the step

Every command runs in a session of its own and is killed, with everything it started, when it runs over its
limit. REPORT_DIR/gpu_report.md and gpu_report.json are rewritten atomically after every command, so a hang or a
kill later loses nothing already measured; full logs go to REPORT_DIR/logs/. The summary table is printed last.
Exit status: 0 when every part passed, 1 otherwise.

``--dry-run`` runs every part on the CPU with tiny sizes (CUDA hidden from the commands), to check this script
where there is no GPU. Only the standard library is imported here, so the check starts and reports even when
torch is broken: torch is imported by the commands, never by this process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
THIS_SCRIPT = Path(__file__).resolve()
NO_CUDA_LINE = "no CUDA device: nothing to check; use --dry-run to exercise the script on CPU"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
# What this script writes into REPORT_DIR; a rerun into the same folder replaces exactly these.
OWNED_ENTRIES = ("gpu_report.md", "gpu_report.json", "logs", "data", "runs", "bench_*.json")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TAIL_LINES = 30
POLL_S = 0.05
MIN_STEP_S = 5.0  # a command given less time than this is not started: it could not prove anything
PYTEST_NO_TESTS_COLLECTED = 5

# The small pretraining recipe of part 3 (about 15 iterations per epoch on the GPU image set).
PRETRAIN_FLAGS = ("--arch", "vit_tiny", "--patch_size", "8", "--depth", "4", "--out_dim", "1024",
                  "--head_hidden_dim", "256", "--head_bottleneck_dim", "64", "--global_crop_size", "32",
                  "--local_crop_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "16",
                  "--epochs", "3", "--warmup_epochs", "1", "--saveckp_freq", "0", "--log_freq", "2")
EVAL_SIZE_FLAGS = ("--resize_size", "36", "--crop_size", "32")
IMAGE_PALETTE = ((200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60), (200, 60, 200), (60, 200, 200))
IMAGE_CLASSES = len(IMAGE_PALETTE)  # one class per colour
IMAGE_SIDE = 64

# Time limits of single commands (seconds); each is also cut to what is left of its part and of the check.
STEP_LIMITS_S = {"environment": 60, "pytest": 100, "images": 30, "pretrain": 60, "knn": 40, "linear": 40,
                 "visualize": 40, "loader": 45, "train_bench": 200}


@dataclass(frozen=True)
class Plan:
    """What one mode of the check runs: time limits (seconds), sizes and precisions."""

    mode: str
    total_limit_s: float
    part_limits_s: dict[str, float]
    images_per_class: tuple[int, int]  # train, val
    precisions: tuple[str, str]  # the run stopped by SIGTERM and resumed, the straight run
    device: str
    workers: int  # data-loading processes of each script
    train_bench_shape: tuple[str, ...]
    train_bench_runs: tuple[tuple[str, tuple[str, ...]], ...]  # (step name, flags) per benchmark command
    loader_flags: tuple[str, ...]
    notes: tuple[str, ...] = ()


GPU_PLAN = Plan(
    mode="GPU",
    total_limit_s=345,
    # Measured on an H200 (16 cores): environment 4 s, CUDA tests 15 s, end to end 84 s, throughput without
    # torch.compile 94 s. Throughput may take what the others leave: the total limit is the one that holds.
    part_limits_s={"environment": 30, "cuda_tests": 100, "end_to_end": 150, "throughput": 240},
    images_per_class=(40, 10),
    precisions=("bf16", "fp16"),
    device="cuda",
    workers=4,
    train_bench_shape=("--arch", "vit_small", "--batch_size", "64", "--local_crops_number", "8", "--out_dim",
                       "65536", "--precision", "bf16", "--steps", "5", "--warmup", "2"),
    # torch.compile for SPARO only, in a command of its own so that a compilation running over its limit costs
    # no other figure: the benchmark builds every configuration twice (speed, then peak memory in a fresh
    # process), so each compiled configuration is compiled twice, and two of them do not fit the time limit.
    train_bench_runs=(("train", ("--readout", "cls", "sparo")),
                      ("train_compiled", ("--readout", "sparo", "--baseline", "false", "--compile"))),
    loader_flags=("--loader_workers", str(os.cpu_count() or 1), "--loader_images", "1024"),
    notes=("torch.compile is timed for SPARO only: compiling CLS too does not fit the time limit.",),
)

DRY_RUN_PLAN = Plan(
    mode="dry run (CPU)",
    total_limit_s=175,
    part_limits_s={"environment": 60, "cuda_tests": 60, "end_to_end": 120, "throughput": 90},
    images_per_class=(16, 4),
    precisions=("fp32", "fp32"),
    device="cpu",
    workers=2,
    train_bench_shape=("--arch", "vit_tiny", "--depth", "2", "--batch_size", "2", "--local_crops_number", "2",
                       "--out_dim", "256", "--global_crop_size", "32", "--local_crop_size", "16", "--precision",
                       "fp32", "--steps", "1", "--warmup", "0", "--device", "cpu"),
    train_bench_runs=(("train", ("--readout", "sparo")),),  # one read-out: each configuration costs processes
    loader_flags=("--loader_workers", "2", "--loader_images", "16"),
    notes=("Dry run: CPU paths and tiny sizes only; no figure here says anything about a GPU.",
           "The loader and the step are measured at different crop sizes here, so 'keeps up' is not meaningful."),
)


@dataclass
class Step:
    """One command of a part."""

    name: str
    status: str  # pass, fail, timeout or skipped
    seconds: float
    returncode: int | None
    log: str  # relative to the report folder; empty when the command was not started
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 1),
                "returncode": self.returncode, "log": self.log}


@dataclass
class Part:
    """One part of the check and what it found."""

    number: int
    key: str
    title: str
    proves: str
    limit_s: float
    status: str = "pending"  # pending, running, then pass, fail, timeout or skipped
    seconds: float = 0.0
    headline: str = ""  # key figures in one line, for the summary table
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    log_tail: str = ""

    def expect(self, condition: bool, problem: str) -> bool:
        """Records ``problem`` unless ``condition`` holds; returns ``condition``."""
        if not condition:
            self.problems.append(problem)
        return condition

    def succeeded(self, step: Step, what: str) -> bool:
        """Whether ``step`` passed; a non-zero exit is recorded as a problem (time-outs already are)."""
        return self.expect(step.status != "fail", f"{what} exited with {step.returncode}") and step.ok

    def settle(self) -> str:
        if any(step.status in ("timeout", "skipped") for step in self.steps):
            return "timeout"
        return "fail" if self.problems else "pass"

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "key": self.key, "title": self.title, "proves": self.proves,
                "status": self.status, "seconds": round(self.seconds, 1), "limit_s": self.limit_s,
                "headline": self.headline, "figures": self.figures, "problems": self.problems, "notes": self.notes,
                "steps": [step.to_json() for step in self.steps], "log_tail": self.log_tail}


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the check itself."""


class Check:
    """One run of the check: its parts, its time budget, its commands and its report."""

    def __init__(self, report_dir: Path, plan: Plan, parts: list[Part]) -> None:
        self.report_dir, self.plan, self.parts = report_dir, plan, parts
        self.logs_dir = report_dir / "logs"
        self.started_at = datetime.now(timezone.utc)
        self.started = time.monotonic()
        self.deadline = self.started + plan.total_limit_s
        self.part_deadline = self.deadline
        self.env = subprocess_environment(hide_cuda=plan.device == "cpu")

    @property
    def dry_run(self) -> bool:
        return self.plan is DRY_RUN_PLAN

    def run_part(self, part: Part, body: Callable[[Check, Part], None]) -> None:
        print(f"[{part.number}/{len(self.parts)}] {part.title} ...", flush=True)
        start = time.monotonic()
        self.part_deadline = min(start + part.limit_s, self.deadline)
        try:
            if self.part_deadline - start < MIN_STEP_S:
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

    def step(self, part: Part, name: str, command: Sequence[str], limit_s: float, *, sigterm_when: str | None = None,
             ok_returncodes: Container[int] = (0,)) -> Step:
        """Runs ``command`` from the repository root, output to logs/<part>_<name>.log, within ``limit_s`` and
        what is left of the part's and the check's time; whatever it started is killed when it ends.

        ``sigterm_when``: once this text appears in the output, SIGTERM goes to the command's own process only,
        as a scheduler preempting a job signals the launcher.
        """
        log_path = self.logs_dir / f"{part.number}_{name}.log"
        timeout = min(limit_s, self.part_deadline - time.monotonic(), self.deadline - time.monotonic())
        if timeout < MIN_STEP_S:
            step = Step(name, "skipped", 0.0, None, log="")
            part.problems.append(f"{name}: not run, the time limit was reached")
        else:
            command = [str(arg) for arg in command]
            start = time.monotonic()
            with open(log_path, "w") as log:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    returncode = wait_for(process, log_path, timeout, sigterm_when)
                finally:
                    kill_everything(process)
            seconds = time.monotonic() - start
            output = log_path.read_text(errors="replace")
            if returncode is None:
                status = "timeout"
                part.problems.append(f"{name}: killed after its time limit of {timeout:.0f} s")
            else:
                status = "pass" if returncode in ok_returncodes else "fail"
            step = Step(name, status, seconds, returncode, str(log_path.relative_to(self.report_dir)), output)
        part.steps.append(step)
        if step.output and all(earlier.ok for earlier in part.steps[:-1]):
            # The tail shown is that of the first command that did not pass, else of the last one.
            part.log_tail = tail(step.output)
        self.write_report()
        return step

    def payload(self) -> dict[str, Any]:
        finished = all(part.status not in ("pending", "running") for part in self.parts)
        result = ("pass" if all(part.status == "pass" for part in self.parts) else "fail") if finished else \
            "in progress"
        return {"mode": self.plan.mode, "command": shlex.join(["bash", "scripts/gpu_check.sh", *sys.argv[1:]]),
                "started": self.started_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
                "elapsed_s": round(time.monotonic() - self.started, 1), "time_limit_s": self.plan.total_limit_s,
                "result": result, "notes": list(self.plan.notes), "parts": [part.to_json() for part in self.parts]}

    def write_report(self) -> None:
        payload = self.payload()
        write_atomically(self.report_dir / "gpu_report.json", json.dumps(payload, indent=2) + "\n")
        write_atomically(self.report_dir / "gpu_report.md", render_markdown(payload))


# -------------------------------------------------------------------------------------------------- processes

def subprocess_environment(hide_cuda: bool) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # The data loaders get processes of their own; more math threads per process would only contend for cores
    # (on the CPU, with tiny models, one thread is the fastest: OpenMP threads spin-wait on busy cores).
    env["OMP_NUM_THREADS"] = "1" if hide_cuda else str(min(4, os.cpu_count() or 1))
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run takes the CPU paths even on a GPU machine
    return env


def wait_for(process: subprocess.Popen, log_path: Path, timeout: float, sigterm_when: str | None) -> int | None:
    """The exit status of ``process``, or None if ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    pending_signal = sigterm_when
    while (returncode := process.poll()) is None:
        if time.monotonic() > deadline:
            return None
        if pending_signal and pending_signal in log_path.read_text(errors="replace"):
            process.send_signal(signal.SIGTERM)
            pending_signal = None
        time.sleep(POLL_S)
    return returncode


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL to ``process``, its process group and every process below it, then reaps it. The group alone is
    not enough: torchrun starts each worker in a session of its own."""
    for pid in [process.pid, *descendants(process.pid)]:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    process.wait()


def raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


# ----------------------------------------------------------------------------------------------------- report

def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def summary_table(payload: dict[str, Any]) -> str:
    rows = ["| part | status | time | key figures |", "|---|---|---|---|"]
    for part in payload["parts"]:
        rows.append(f"| {part['number']}. {part['title']} | {part['status']} | "
                    f"{part['seconds']:.0f} s of {part['limit_s']:.0f} s | {_cell(part['headline'])} |")
    return "\n".join(rows)


def render_markdown(payload: dict[str, Any]) -> str:
    lines = ["# dino_sparo GPU check", "",
             f"- mode: {payload['mode']}; command: `{payload['command']}`",
             f"- started {payload['started']}; {payload['elapsed_s']:.0f} s elapsed of at most "
             f"{payload['time_limit_s']:.0f} s; result: **{payload['result']}**",
             *(f"- {note}" for note in payload["notes"]), "", summary_table(payload)]
    for part in payload["parts"]:
        lines += ["", f"## {part['number']}. {part['title']}: {part['status']} ({part['seconds']:.1f} s of "
                  f"{part['limit_s']:.0f} s)", "", f"Proves: {part['proves']}"]
        if part["problems"]:
            lines += ["", "Problems:", *(f"- {problem}" for problem in part["problems"])]
        if part["notes"]:
            lines += ["", "Notes:", *(f"- {note}" for note in part["notes"])]
        if part["figures"]:
            lines += ["", "| figure | value |", "|---|---|",
                      *(f"| {_cell(name)} | {_cell(value)} |" for name, value in part["figures"].items())]
        if part["steps"]:
            lines += ["", "| command | status | time | exit | log |", "|---|---|---|---|---|",
                      *(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} s | {s['returncode']} | "
                        + (f"`{s['log']}` |" if s["log"] else "|") for s in part["steps"])]
        if part["log_tail"]:
            lines += ["", "Log tail:", "", "```text", part["log_tail"], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ parts

def helper_command(name: str, *args: Any) -> list[str]:
    return [sys.executable, str(THIS_SCRIPT), "--helper", name, *map(str, args)]


def check_environment(check: Check, part: Part) -> None:
    step = check.step(part, "environment", helper_command("environment"), STEP_LIMITS_S["environment"])
    if not part.succeeded(step, "the environment probe (importing torch, querying the device)"):
        return
    info = json.loads(step.output.strip().splitlines()[-1])
    part.figures.update(info)
    if info["cuda_available"]:
        part.headline = (f"{info['gpu']} ({info['gpu_memory_gib']} GiB, sm {info['compute_capability']}), "
                         f"bf16 native: {'yes' if info['bf16_native'] else 'no'}; torch {info['torch']}, "
                         f"CUDA {info['cuda']}, cuDNN {info['cudnn']}, NCCL {info['nccl']}; "
                         f"{info['cpu_cores']} CPU cores")
    else:
        part.headline = f"no GPU: {info['cpu']}, {info['cpu_cores']} cores; torch {info['torch']}"
    if not check.dry_run:
        part.expect(info["cuda_available"], "torch sees no CUDA device in the check's commands")


def pytest_counts(output: str) -> dict[str, int]:
    """Outcome counts from pytest's final summary line ("2 passed, 1 skipped, 150 deselected in 3.2s")."""
    summary = next((line for line in reversed(output.splitlines()) if re.search(r" in [\d.]+s", line)), "")
    return {word.rstrip("s") if word.startswith("error") else word: int(count)
            for count, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                          summary)}


def collection_errors(output: str) -> list[str]:
    """``module: first error line`` for every test module pytest could not import."""
    found = re.findall(r"_ ERROR collecting (\S+) _+\n(?:(?!_ ERROR collecting).*\n)*?E +(.+)", output)
    return [f"{module}: {error.strip()}" for module, error in found]


def check_cuda_tests(check: Check, part: Part) -> None:
    # A module that cannot be imported here (say, one needing a package this machine lacks) must not keep the
    # CUDA tests of the other modules from running: they run, and the import errors are reported.
    step = check.step(part, "pytest", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs",
                                       "-p", "no:cacheprovider", "--continue-on-collection-errors"],
                      STEP_LIMITS_S["pytest"],
                      # In the dry run, where no test can use CUDA, finding none is not the command's failure.
                      ok_returncodes=(0, PYTEST_NO_TESTS_COLLECTED) if check.dry_run else (0,))
    counts = pytest_counts(step.output)
    part.figures.update({name: counts.get(name, 0) for name in ("passed", "failed", "skipped", "error")})
    part.headline = ", ".join(f"{counts.get(name, 0)} {name}" for name in ("passed", "failed", "skipped"))
    if counts.get("error"):
        part.headline += f", {counts['error']} errors"
    if step.status in ("timeout", "skipped"):
        return
    broken = collection_errors(step.output)
    part.expect(not broken, f"{len(broken)} test module(s) could not be imported, so any CUDA tests in them did "
                            f"not run: {'; '.join(broken)}")
    if step.returncode == PYTEST_NO_TESTS_COLLECTED:
        part.headline = "no CUDA tests collected"
        if check.dry_run:
            part.notes.append("no test is marked cuda yet: on a GPU this part fails")
        else:
            part.problems.append("no CUDA tests collected")
    elif part.expect(step.returncode in (0, 1), f"pytest exited with {step.returncode} (see the log)"):
        part.expect(counts.get("failed", 0) == 0, f"{counts.get('failed', 0)} CUDA test(s) failed")
        if not check.dry_run:
            part.expect(counts.get("passed", 0) > 0, "no CUDA test passed on the GPU: every one was skipped "
                                                     "(reasons in the log)")


PREEMPTED = re.compile(r"stopped: preempted by SIGTERM at epoch (\d+), iteration (\d+)")
RESUMED = re.compile(r"resumed from \S+ at epoch (\d+)(?:, iteration (\d+) of \d+)?")
TRAINING_SETUP = re.compile(r"precision (\w+); device (\S+);")


def training_figures(output: str) -> dict[str, Any]:
    """Median images/s and the largest ``max mem`` of main_dino.py's progress lines, precision and device."""
    rates = [float(rate) for rate in re.findall(r"img/s: ([\d.]+)", output)]
    memory = [int(mb) for mb in re.findall(r"max mem: (\d+)MB", output)]
    setup = TRAINING_SETUP.search(output)
    return {"images_per_s": round(statistics.median(rates), 1) if rates else None,
            "max_mem_mb": max(memory) if memory else None,
            "precision": setup.group(1) if setup else None, "device": setup.group(2) if setup else None}


def record_training(check: Check, part: Part, output: str, precision: str, label: str) -> None:
    """Throughput and memory of a pretraining run, and a problem unless it ran in ``precision`` on the device."""
    figures = training_figures(output)
    part.expect(figures["precision"] == precision and str(figures["device"]).startswith(check.plan.device),
                f"{label}: ran with precision {figures['precision']} on {figures['device']}, expected {precision} "
                f"on {check.plan.device}")
    part.figures[f"{label}: images/s (median)"] = figures["images_per_s"]
    if figures["max_mem_mb"] is not None:  # printed on CUDA only
        part.figures[f"{label}: max mem MB"] = figures["max_mem_mb"]


def pretrain_command(check: Check, data: Path, output_dir: Path, precision: str) -> list[str]:
    return [*TORCHRUN, "main_dino.py", "--data_path", str(data), "--output_dir", str(output_dir), *PRETRAIN_FLAGS,
            "--precision", precision, "--device", check.plan.device, "--num_workers", str(check.plan.workers)]


def pretrain_preempted_and_resumed(check: Check, part: Part, command: list[str], precision: str, label: str) -> None:
    """The run is sent SIGTERM once it has logged an iteration; it must save its state and stop, and the same
    command must then resume it where it stopped and finish."""
    # torchrun itself exits non-zero when it is signalled, whatever its worker did: the log tells.
    stopped = check.step(part, f"pretrain_{precision}_preempted", command, STEP_LIMITS_S["pretrain"],
                         sigterm_when="img/s:", ok_returncodes=range(1, 256))
    if stopped.status in ("timeout", "skipped"):
        return
    preempted = PREEMPTED.search(stopped.output)
    # torchrun signals each worker's whole process group, so the DataLoader's processes get the SIGTERM too.
    loader_killed = re.search(r"DataLoader worker \(pid \d+\) is killed by signal", stopped.output) is not None
    loader_advice = ("the DataLoader worker processes died of the SIGTERM (torchrun signals each worker's whole "
                     "process group): they must ignore the preemption signals")
    if preempted:
        part.figures[f"{label}: stopped at"] = f"epoch {preempted[1]}, iteration {preempted[2]}"
        if loader_killed:
            part.notes.append(f"{label}: training stopped cleanly, but only by winning a race: {loader_advice}")
    elif stopped.returncode == 0:
        part.problems.append(f"{label}: finished before the SIGTERM took effect, so preemption was not tested")
    else:
        part.problems.append(f"{label}: SIGTERM to torchrun did not stop training cleanly (exit "
                             f"{stopped.returncode}, no 'stopped: preempted' line)"
                             + (f"; {loader_advice}" if loader_killed else ""))

    resumed = check.step(part, f"pretrain_{precision}_resumed", command, STEP_LIMITS_S["pretrain"])
    if not part.succeeded(resumed, f"{label}: the rerun"):
        return
    resume_line = RESUMED.search(resumed.output)
    if part.expect(resume_line is not None, f"{label}: the rerun did not resume ('resumed from' missing)"):
        part.figures[f"{label}: resumed at"] = f"epoch {resume_line[1]}, iteration {resume_line[2] or 0}"
        if preempted:
            part.expect(resume_line.group(1, 2) == preempted.group(1, 2),
                        f"{label}: resumed at epoch {resume_line[1]}, iteration {resume_line[2]}, not where it "
                        "stopped")
    record_training(check, part, stopped.output + resumed.output, precision, label)


def check_end_to_end(check: Check, part: Part) -> None:
    data, runs = check.report_dir / "data", check.report_dir / "runs"
    images = check.step(part, "images", helper_command("images", data, *check.plan.images_per_class),
                        STEP_LIMITS_S["images"])
    if not part.succeeded(images, "generating the image set"):
        return
    first, second = check.plan.precisions
    labels = (f"{first} (SIGTERM, resume)", f"{second}")
    checkpoint = runs / "pretrain_preempted" / "checkpoint.pth"
    pretrain_preempted_and_resumed(check, part, pretrain_command(check, data / "train", checkpoint.parent, first),
                                   first, labels[0])
    straight = check.step(part, f"pretrain_{second}",
                          pretrain_command(check, data / "train", runs / "pretrain_straight", second),
                          STEP_LIMITS_S["pretrain"])
    if part.succeeded(straight, f"{labels[1]}: main_dino.py"):
        record_training(check, part, straight.output, second, labels[1])

    if part.expect(checkpoint.exists(), f"no checkpoint from the {first} run: evaluations not run"):
        evaluate(check, part, checkpoint, data, runs)
    part.headline = summarise_end_to_end(part.figures, labels)


def evaluate(check: Check, part: Part, checkpoint: Path, data: Path, runs: Path) -> None:
    """k-NN, one epoch of linear probe and the attention maps of ``checkpoint``."""
    workers = ("--num_workers", str(check.plan.workers))
    knn = check.step(part, "knn", [sys.executable, "eval_knn.py", "--pretrained_weights", checkpoint,
                                   "--data_path", data, *EVAL_SIZE_FLAGS, "--nb_knn", "10", "20", *workers,
                                   "--output_dir", runs / "knn"], STEP_LIMITS_S["knn"])
    top1 = dict(re.findall(r"(\d+)-NN classifier result: Top1: ([\d.]+)", knn.output))
    if part.succeeded(knn, "eval_knn.py") and part.expect(bool(top1), "eval_knn.py printed no accuracy"):
        part.figures.update({f"k-NN top-1 (k={k})": float(value) for k, value in top1.items()})

    linear = check.step(part, "linear", [sys.executable, "eval_linear.py", "--pretrained_weights", checkpoint,
                                         "--data_path", data, *EVAL_SIZE_FLAGS, "--epochs", "1", *workers,
                                         "--output_dir", runs / "linear"], STEP_LIMITS_S["linear"])
    accuracy = re.search(r"Top-1 test accuracy: ([\d.]+)", linear.output)
    if part.succeeded(linear, "eval_linear.py") and part.expect(accuracy is not None,
                                                                "eval_linear.py printed no accuracy"):
        part.figures["linear top-1 (1 epoch)"] = float(accuracy[1])

    viz_dir = runs / "visualize"
    viz = check.step(part, "visualize", [sys.executable, "visualize_sparo.py", "--pretrained_weights", checkpoint,
                                         "--images", data / "val", "--max_images", "3", "--image_size",
                                         str(IMAGE_SIDE), "--device", check.plan.device, "--output_dir", viz_dir],
                     STEP_LIMITS_S["visualize"])
    if part.succeeded(viz, "visualize_sparo.py"):
        missing = [name for name in ("slots.png", "heads.png") if not (viz_dir / name).exists()]
        if part.expect(not missing, f"visualize_sparo.py wrote no {', '.join(missing)}"):
            part.figures["attention maps"] = "slots.png, heads.png written"


def summarise_end_to_end(figures: dict[str, Any], labels: Sequence[str]) -> str:
    pieces = []
    for label in labels:
        if f"{label}: images/s (median)" in figures:
            memory = figures.get(f"{label}: max mem MB")
            pieces.append(f"{label} {figures[f'{label}: images/s (median)']} img/s"
                          + (f", max mem {memory} MB" if memory is not None else ""))
    if f"{labels[0]}: resumed at" in figures and f"{labels[0]}: stopped at" in figures:
        pieces.append(f"stopped and resumed at {figures[f'{labels[0]}: resumed at']}")
    pieces += [f"{name} {figures[name]}" for name in ("k-NN top-1 (k=20)", "linear top-1 (1 epoch)") if name in figures]
    return "; ".join(pieces)


def benchmark_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def step_label(row: dict[str, Any]) -> str:
    return f"step {row['readout']} {row['mode']} {row['precision']}" + (" compiled" if row["compile"] else "")


def check_throughput(check: Check, part: Part) -> None:
    loader_json = check.report_dir / "bench_loader.json"
    loader = check.step(part, "loader", [sys.executable, "-m", "benchmarks.run", "--bench", "loader",
                                         *check.plan.loader_flags, "--json", loader_json], STEP_LIMITS_S["loader"])
    loader_rate, loader_mode = None, None
    if part.succeeded(loader, "the loader benchmark"):
        # One row per worker-side pipeline: "pil" (the reference chain) and "uint8" (the fast path's worker half,
        # whose device half runs inside the step's stream); the fastest is what feeds the step.
        for row in benchmark_rows(loader_json):
            part.figures[f"loader {row['mode']} ({row['workers']} workers, {row['config']})"] = \
                f"{row['images_per_s']:.0f} img/s"
            if loader_rate is None or row["images_per_s"] > loader_rate:
                loader_rate, loader_mode = row["images_per_s"], row["mode"]

    measured: dict[str, dict[str, Any]] = {}  # label -> row; a configuration timed twice keeps its first row
    for name, flags in check.plan.train_bench_runs:
        path = check.report_dir / f"bench_{name}.json"
        bench = check.step(part, name, [sys.executable, "-m", "benchmarks.run", "--bench", "train",
                                        *check.plan.train_bench_shape, *flags, "--json", path],
                           STEP_LIMITS_S["train_bench"])
        if part.succeeded(bench, name):
            for row in benchmark_rows(path):
                measured.setdefault(step_label(row), row)
    train_rows = list(measured.values())
    baselines = {row["readout"]: row for row in train_rows if row["mode"] == "baseline"}
    for label, row in measured.items():
        base = baselines.get(row["readout"]) if row["mode"] == "fast" else None
        speedup = f", {row['images_per_s'] / base['images_per_s']:.2f}x the baseline" if base else ""
        part.figures[label] = f"{row['images_per_s']:.1f} img/s, peak {row['peak_mib']:.0f} MiB{speedup}"

    headline = [f"loader ({loader_mode}) {loader_rate:.0f} img/s"] if loader_rate else []
    for readout in dict.fromkeys(row["readout"] for row in train_rows):
        fastest = max((row for row in train_rows if row["readout"] == readout and row["mode"] == "fast"),
                      key=lambda row: row["images_per_s"], default=None)
        if fastest is None:
            continue
        headline.append(f"{readout} step {fastest['images_per_s']:.0f} img/s")
        if loader_rate:
            keeps_up = "yes" if loader_rate >= fastest["images_per_s"] else "no"
            part.figures[f"loader keeps up ({readout})"] = (
                f"{keeps_up} (loader {loader_mode} {loader_rate:.0f} img/s vs {step_label(fastest)} "
                f"{fastest['images_per_s']:.0f} img/s)")
            headline[-1] += f", loader keeps up: {keeps_up}"
    part.headline = "; ".join(headline)


PARTS = (
    ("environment", "environment", "the GPU is visible to torch; versions, memory and native bf16 are recorded",
     check_environment),
    ("cuda_tests", "CUDA tests", "the tests marked `cuda` pass on the GPU", check_cuda_tests),
    ("end_to_end", "end to end", "torchrun + NCCL pretraining in bf16 autocast, stopped by SIGTERM mid-epoch and "
     "resumed from its checkpoint; fp16 with a GradScaler; fused AdamW and cudnn.benchmark on the way; k-NN and "
     "linear probe on GPU features; slot and head attention maps", check_end_to_end),
    ("throughput", "throughput", "images/s and peak GPU memory of the training step (reference-style baseline "
     "vs ours, CLS and SPARO, with torch.compile) and of the multi-worker data loader, and whether the loader "
     "keeps up", check_throughput),
)


# ---------------------------------------------------------------------------------------------------- helpers
# Run as `gpu_check.py --helper NAME ARGS...` in a subprocess, so that this process never imports torch.

def print_environment() -> None:
    """Versions, CPU and GPU, as one JSON line."""
    import platform
    from importlib import metadata

    import torch

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torchvision": version("torchvision"), "timm": version("timm"), "cpu": cpu,
                            "cpu_cores": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    compute_capability=f"{properties.major}.{properties.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                    gpu_count=torch.cuda.device_count())
    print(json.dumps(info))


def write_image_set(folder: str, train_per_class: str, val_per_class: str) -> None:
    """IMAGE_CLASSES classes of IMAGE_SIDE px PNGs in folder/{train,val}/class_K/: noise around the class's
    colour, with a square of a random colour at a random place, so that colour is learnable but not the whole
    image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    palette = np.array(IMAGE_PALETTE, dtype=np.float64)
    for split, count in (("train", int(train_per_class)), ("val", int(val_per_class))):
        for label in range(IMAGE_CLASSES):
            class_dir = Path(folder) / split / f"class_{label}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = palette[label] + rng.normal(0, 25, (IMAGE_SIDE, IMAGE_SIDE, 3))
                size = int(rng.integers(12, 28))
                top, left = rng.integers(0, IMAGE_SIDE - size, 2)
                pixels[top:top + size, left:left + size] = rng.integers(0, 256, 3)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(class_dir / f"{index:03d}.png")
    print(f"wrote {IMAGE_CLASSES} classes x ({train_per_class} train + {val_per_class} val) images to {folder}")


HELPERS: dict[str, Callable[..., None]] = {"environment": print_environment, "images": write_image_set}


# ------------------------------------------------------------------------------------------------------- main

def cuda_absent() -> bool:
    """True only when torch imports and says there is no CUDA device; a broken torch is left to the check."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, timeout=60, env=subprocess_environment(False))
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and probe.stdout.strip() == "False"


def prepare_report_dir(path: Path) -> Path:
    """Creates ``path`` with an empty logs/; the entries an earlier check wrote there are replaced, but a
    non-empty folder without an earlier report is refused, so that nothing else is ever deleted."""
    path = path.resolve()
    if path.is_dir() and any(path.iterdir()) and not (path / "gpu_report.json").exists():
        print(f"error: {path} is not empty and holds no earlier gpu_report.json: give a new or empty folder",
              file=sys.stderr)
        raise SystemExit(2)
    for pattern in OWNED_ENTRIES:
        for entry in path.glob(pattern):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    (path / "logs").mkdir(parents=True)
    return path


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser("gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run every part on the CPU with tiny sizes, to check this script without a GPU")
    parser.add_argument("report_dir", nargs="?", default="gpu_report",
                        help="where gpu_report.md, gpu_report.json, logs/ and the runs' outputs go "
                        "(default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--helper"]:
        HELPERS[argv[1]](*argv[2:])
        return 0
    args = parse_args(argv)
    if not args.dry_run and cuda_absent():
        print(NO_CUDA_LINE)
        return 0
    plan = DRY_RUN_PLAN if args.dry_run else GPU_PLAN
    parts = [Part(number, key, title, proves, plan.part_limits_s[key])
             for number, (key, title, proves, _) in enumerate(PARTS, start=1)]
    check = Check(prepare_report_dir(Path(args.report_dir)), plan, parts)
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    try:
        for part, (*_, body) in zip(parts, PARTS):
            check.run_part(part, body)
    except Interrupted as interruption:
        for part in parts:
            if part.status in ("pending", "running"):
                part.status = "skipped" if part.status == "pending" else "fail"
                part.problems.append(f"the check was interrupted by {interruption}")
        check.write_report()
    payload = check.payload()
    print(f"\nresult: {payload['result']} in {payload['elapsed_s']:.0f} s ({plan.mode}); report: "
          f"{check.report_dir / 'gpu_report.md'} (and gpu_report.json, logs/)\n")
    print(summary_table(payload), flush=True)
    return 0 if payload["result"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
