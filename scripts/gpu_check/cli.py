"""The command line: ``bash scripts/gpu_check.sh [--dry-run] [--parts PARTS] [REPORT_DIR]`` (see the package's
docstring)."""
from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.processes import run_with_timeout

from . import __doc__ as OVERVIEW
from .cuda_tests import check_cuda_tests
from .end_to_end import check_end_to_end
from .environment import check_environment
from .plan import PART_KEYS, dry_run_plan, gpu_plan
from .pretraining_speed import check_pretraining_speed
from .report import NOT_SELECTED, Part, summary_table
from .supervisor import REPORT_FILES, Check, command_interpreter, subprocess_environment
from .throughput import check_throughput

NO_CUDA_LINE = "no CUDA device: nothing to check; use --dry-run to exercise the script on CPU"

PARTS: tuple[tuple[str, str, str, Callable[[Check, Part], None]], ...] = (
    ("environment", "environment", "the GPU is visible to torch; versions, memory, native bf16, the C compiler, "
     "Triton, /dev/shm, usable cores, TF32 and the attention kernel are recorded", check_environment),
    ("cuda_tests", "CUDA tests", "the tests marked `cuda` pass on the GPU", check_cuda_tests),
    ("end_to_end", "end to end", "torchrun + NCCL pretraining in bf16 autocast, stopped by SIGTERM mid-epoch and "
     "resumed from its checkpoint where it stopped; fp16 with a GradScaler; fused AdamW and cudnn.benchmark on the "
     "way; k-NN and linear probe on GPU features; slot and head attention maps", check_end_to_end),
    ("pretraining_speed", "pretraining speed", "main_dino.py trains ViT-S/16 (2x224 + 8x96 crops, batch 64, out_dim "
     "65536) on 500x375 JPEGs with one DataLoader worker per spare core and the augmentation on the GPU; its "
     "images/s and the share of time spent waiting for data are recorded", check_pretraining_speed),
    ("throughput", "throughput", "images/s and peak GPU memory of the training step (reference-style baseline "
     "vs ours, CLS and SPARO, then SPARO with torch.compile in its own reserved time) and of the multi-worker data "
     "loader, and whether the loader keeps up", check_throughput),
)


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the check itself."""


def raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def cuda_absent() -> bool:
    """True only when torch imports and says there is no CUDA device; a broken torch is left to the check."""
    try:
        probe = run_with_timeout([command_interpreter(), "-c", "import torch; print(torch.cuda.is_available())"], 60,
                                 env=subprocess_environment(hide_cuda=False))
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and probe.stdout.strip() == "False"


def prepare_report_dir(path: Path) -> Path:
    """Creates ``path``; the files an earlier check wrote there are replaced, but a folder holding anything else
    is refused, so that nothing else is ever deleted (and nothing else is copied off a machine with the report)."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise SystemExit(f"error: {path} is not a folder")
    others = sorted(entry.name for entry in path.iterdir() if entry.name not in REPORT_FILES) if path.is_dir() else []
    if others:
        raise SystemExit(f"error: {path} holds {', '.join(others)}, which the check did not write: give a new or "
                         f"empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:
            (path / name).unlink(missing_ok=True)
    except OSError as error:
        raise SystemExit(f"error: cannot write the report into {path}: {error.strerror}") from None
    return path


def selected_parts(text: str | None) -> tuple[str, ...]:
    """The part keys ``--parts`` names (keys or numbers, comma-separated), in the check's order; all by default."""
    if text is None:
        return PART_KEYS
    chosen = set()
    for item in filter(None, (item.strip() for item in text.split(","))):
        key = PART_KEYS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(PART_KEYS) else item
        if key not in PART_KEYS:
            raise SystemExit(f"error: --parts: unknown part {item!r}; the parts are 1-{len(PART_KEYS)} or "
                             f"{', '.join(PART_KEYS)}")
        chosen.add(key)
    if not chosen:
        raise SystemExit("error: --parts names no part")
    return tuple(key for key in PART_KEYS if key in chosen)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser("gpu_check", description=OVERVIEW.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run every part on the CPU with tiny sizes, to check the check without a GPU")
    parser.add_argument("--parts", default=None,
                        help="run only these parts, by number or name, comma-separated (e.g. 3,throughput); the "
                        f"others are reported as not selected. Parts: {', '.join(PART_KEYS)}")
    parser.add_argument("report_dir", nargs="?", default="gpu_report",
                        help=f"where the check's only files go ({', '.join(REPORT_FILES)}); data, checkpoints and "
                        "runs go to a temporary folder, removed at the end (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    selected = selected_parts(args.parts)
    if not args.dry_run and cuda_absent():
        print(NO_CUDA_LINE)
        return 0
    plan = dry_run_plan() if args.dry_run else gpu_plan()
    parts = [Part(number, key, title, proves, plan.part_limits_s[key]) for number, (key, title, proves, _) in
             enumerate(PARTS, start=1)]
    parts[-1].limit_s += plan.compile_reserve_s  # the throughput part ends the check with torch.compile
    parts[-1].reserved_s = plan.compile_reserve_s
    for part in parts:
        if part.key not in selected:
            part.status = NOT_SELECTED
    report_dir = prepare_report_dir(Path(args.report_dir))
    work_dir = Path(tempfile.mkdtemp(prefix="dino_sparo_gpu_check_"))
    check = Check(report_dir, work_dir, plan, parts, shlex.join(["bash", "scripts/gpu_check.sh", *argv]))
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    try:
        check.say(f"{plan.mode}: parts {', '.join(selected)} within {check.time_limit_s:.0f} s")
        for part, (*_, body) in zip(parts, PARTS):
            check.run_part(part, body)
    except Interrupted as interruption:
        for part in parts:
            if part.status in ("pending", "running"):
                part.status = "skipped" if part.status == "pending" else "fail"
                part.problems.append(f"the check was interrupted by {interruption}")
        check.write_report()
    finally:
        check.archive_logs()
        shutil.rmtree(work_dir, ignore_errors=True)
    payload = check.payload()
    check.say(f"\nresult: {payload['result']} in {payload['elapsed_s']:.0f} s ({plan.mode}); report: "
              f"{report_dir / 'gpu_report.md'} (and gpu_report.json, console.log, logs.tgz)\n")
    check.say(summary_table(payload))
    return 0 if payload["result"] == "pass" else 1
