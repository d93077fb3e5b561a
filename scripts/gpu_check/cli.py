"""The command line: ``bash scripts/gpu_check.sh [--dry-run] [REPORT_DIR]`` (see the package's docstring)."""
from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.processes import run_with_timeout

from . import __doc__ as OVERVIEW
from .cuda_tests import check_cuda_tests
from .end_to_end import check_end_to_end
from .environment import check_environment
from .plan import dry_run_plan, gpu_plan
from .pretraining_speed import check_pretraining_speed
from .report import Part, summary_table
from .supervisor import Check, subprocess_environment
from .throughput import check_throughput

NO_CUDA_LINE = "no CUDA device: nothing to check; use --dry-run to exercise the script on CPU"
# What the check writes into REPORT_DIR; a rerun into the same folder replaces exactly these.
OWNED_ENTRIES = ("gpu_report.md", "gpu_report.json", "logs")

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
        probe = run_with_timeout([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], 60,
                                 env=subprocess_environment(hide_cuda=False))
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and probe.stdout.strip() == "False"


def prepare_report_dir(path: Path) -> Path:
    """Creates ``path`` with an empty logs/; the entries an earlier check wrote there are replaced, but a
    non-empty folder without an earlier report is refused, so that nothing else is ever deleted."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise SystemExit(f"error: {path} is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / "gpu_report.json").exists():
        raise SystemExit(f"error: {path} is not empty and holds no earlier gpu_report.json: give a new or empty "
                         f"folder")
    for pattern in OWNED_ENTRIES:
        for entry in path.glob(pattern):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        (path / "logs").mkdir(parents=True)
    except OSError as error:
        raise SystemExit(f"error: cannot write the report into {path}: {error.strerror}") from None
    return path


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser("gpu_check", description=OVERVIEW.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run every part on the CPU with tiny sizes, to check the check without a GPU")
    parser.add_argument("report_dir", nargs="?", default="gpu_report",
                        help="where gpu_report.md, gpu_report.json and logs/ go; data, checkpoints and runs go to a "
                        "temporary folder, removed at the end (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if not args.dry_run and cuda_absent():
        print(NO_CUDA_LINE)
        return 0
    plan = dry_run_plan() if args.dry_run else gpu_plan()
    parts = [Part(number, key, title, proves, plan.part_limits_s[key]) for number, (key, title, proves, _) in
             enumerate(PARTS, start=1)]
    parts[-1].limit_s += plan.compile_reserve_s  # the throughput part ends the check with torch.compile
    parts[-1].reserved_s = plan.compile_reserve_s
    report_dir = prepare_report_dir(Path(args.report_dir))
    work_dir = Path(tempfile.mkdtemp(prefix="dino_sparo_gpu_check_"))
    check = Check(report_dir, work_dir, plan, parts, shlex.join(["bash", "scripts/gpu_check.sh", *argv]))
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
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    payload = check.payload()
    print(f"\nresult: {payload['result']} in {payload['elapsed_s']:.0f} s ({plan.mode}); report: "
          f"{report_dir / 'gpu_report.md'} (and gpu_report.json, logs/)\n")
    print(summary_table(payload), flush=True)
    return 0 if payload["result"] == "pass" else 1
