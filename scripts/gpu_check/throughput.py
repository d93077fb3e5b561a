"""Part 5, throughput: the multi-worker data loader and the training step (reference-style baseline against ours,
CLS and SPARO), whether the loader keeps up, and last, in the time reserved for it, the step under torch.compile.
Each benchmark row reaches the report as soon as ``benchmarks.run`` has written it, so a command stopped at its
time limit keeps the rows it finished."""
from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import Part, Step
from .supervisor import Check, Watch
from .training_log import benchmark_rows


def new_rows(path: Path, on_rows: Callable[[list[dict[str, Any]]], None]) -> Watch:
    """Hands each row of the benchmark's JSON file to ``on_rows`` once, as soon as it is there."""
    state = {"seen": 0, "stamp": None}

    def watch(process: subprocess.Popen, log_path: Path) -> bool:
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if stamp == state["stamp"]:
            return False
        state["stamp"] = stamp
        rows = benchmark_rows(path)
        if len(rows) <= state["seen"]:
            return False
        on_rows(rows[state["seen"]:])
        state["seen"] = len(rows)
        return True

    return watch


def step_label(row: dict[str, Any]) -> str:
    return f"step {row['readout']} {row['mode']} {row['precision']}" + (" compiled" if row["compile"] else "")


class Throughput:
    """The rows measured so far and what the report shows of them."""

    def __init__(self, part: Part) -> None:
        self.part = part
        self.loader: dict[str, Any] | None = None  # the fastest loader row
        self.steps: dict[str, dict[str, Any]] = {}  # label -> row; a configuration timed twice keeps its first row
        self.unfinished: list[str] = []  # what ran out of its time, for the headline

    def add_loader_rows(self, rows: list[dict[str, Any]]) -> None:
        # One row per worker-side pipeline: "pil" (the reference chain) and "uint8" (the fast path's worker half,
        # whose device half runs inside the step's stream); the fastest is what feeds the step.
        for row in rows:
            self.part.figures[f"loader {row['mode']} ({row['workers']} workers, {row['config']})"] = \
                f"{row['images_per_s']:.0f} img/s"
            if self.loader is None or row["images_per_s"] > self.loader["images_per_s"]:
                self.loader = row
        self.summarise()

    def add_step_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.steps.setdefault(step_label(row), row)
        baselines = {row["readout"]: row for row in self.steps.values() if row["mode"] == "baseline"}
        for label, row in self.steps.items():
            base = baselines.get(row["readout"]) if row["mode"] == "fast" else None
            speedup = f", {row['images_per_s'] / base['images_per_s']:.2f}x the baseline" if base else ""
            skipped = row.get("skipped_steps")
            skips = f", {skipped} timed step(s) skipped by the GradScaler" if skipped else ""
            self.part.figures[label] = (f"{row['images_per_s']:.1f} img/s, peak {row['peak_mib']:.0f} MiB{speedup}"
                                        f"{skips}")
        self.summarise()

    def summarise(self) -> None:
        loader = self.loader
        headline = [f"loader ({loader['mode']}) {loader['images_per_s']:.0f} img/s"] if loader else []
        rows = list(self.steps.values())
        for readout in dict.fromkeys(row["readout"] for row in rows):
            fastest = max((row for row in rows if row["readout"] == readout and row["mode"] == "fast"),
                          key=lambda row: row["images_per_s"], default=None)
            if fastest is None:
                continue
            headline.append(f"{readout} step {fastest['images_per_s']:.0f} img/s"
                            + (" (compiled)" if fastest["compile"] else ""))
            if loader:
                keeps_up = "yes" if loader["images_per_s"] >= fastest["images_per_s"] else "no"
                self.part.figures[f"loader keeps up ({readout})"] = (
                    f"{keeps_up} (loader {loader['mode']} {loader['images_per_s']:.0f} img/s vs "
                    f"{step_label(fastest)} {fastest['images_per_s']:.0f} img/s)")
                headline[-1] += f", loader keeps up: {keeps_up}"
        self.part.headline = "; ".join(headline + self.unfinished)


def benchmark(check: Check, part: Part, name: str, flags: tuple[str, ...], limit_s: float,
              on_rows: Callable[[list[dict[str, Any]]], None], reserved: bool = False) -> Step:
    """``python -m benchmarks.run FLAGS --json logs/<part>_<name>.json``, its rows reported as they come."""
    path = check.logs_dir / f"{part.number}_{name}.json"
    step = check.step(part, name, [check.python, "-m", "benchmarks.run", *flags, "--json", path], limit_s,
                      watch=new_rows(path, on_rows), reserved=reserved)
    part.succeeded(step, name)
    return step


def check_throughput(check: Check, part: Part) -> None:
    plan, measured = check.plan, Throughput(part)
    benchmark(check, part, "loader", ("--bench", "loader", *plan.loader_flags), check.limit(part, "loader"),
              measured.add_loader_rows)
    benchmark(check, part, "train", ("--bench", "train", *plan.train_bench_shape, *plan.train_bench_flags),
              check.limit(part, "train_bench"), measured.add_step_rows)
    # Last in the whole check, in the time kept for it and whatever the others left: running over it costs no
    # other figure.
    compiled = benchmark(check, part, "train_compiled", ("--bench", "train", *plan.train_bench_shape,
                                                         *plan.compile_bench_flags),
                         check.time_limit_s, measured.add_step_rows, reserved=True)
    if compiled.status in ("timeout", "skipped"):
        outcome = f"no figure within {compiled.seconds:.0f} s" if compiled.status == "timeout" else "no time left"
        measured.unfinished.append(f"torch.compile: {outcome} (information)")
        measured.summarise()
