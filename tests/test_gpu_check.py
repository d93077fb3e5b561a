"""scripts/gpu_check.sh, the GPU acceptance check: its CPU dry run passes and reports every part, and on a
machine without CUDA the plain command says so in one line and does nothing else."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PART_TITLES = ("environment", "CUDA tests", "end to end", "throughput")
NO_CUDA_LINE = "no CUDA device: nothing to check; use --dry-run to exercise the script on CPU"


def run_check(args: list[str], scratch: Path, timeout: float) -> subprocess.CompletedProcess:
    """The script with this interpreter, temporary files under ``scratch`` and no bytecode written, so that
    nothing lands outside the test's folder. On a time-out the check gets SIGTERM, on which it kills its
    commands (they run in sessions of their own) and writes its report, before the test fails."""
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"the check ran over {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the real check would run")
def test_without_cuda_the_check_says_so_in_one_line_and_exits_0(tmp_path):
    report_dir = tmp_path / "report"
    completed = run_check([str(report_dir)], tmp_path / "scratch", timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == NO_CUDA_LINE + "\n"
    assert not report_dir.exists()


@pytest.mark.slow
def test_dry_run_passes_every_part_and_writes_both_reports(tmp_path):
    report_dir = tmp_path / "report"
    completed = run_check(["--dry-run", str(report_dir)], tmp_path / "scratch", timeout=300)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-3000:]

    report = json.loads((report_dir / "gpu_report.json").read_text())
    assert report["result"] == "pass" and report["mode"] == "dry run (CPU)"
    assert [part["title"] for part in report["parts"]] == list(PART_TITLES)
    for part in report["parts"]:
        assert part["status"] == "pass", part
        assert 0 < part["seconds"] <= part["limit_s"] + 5
        for step in part["steps"]:
            assert (report_dir / step["log"]).is_file()
    figures = {part["key"]: part["figures"] for part in report["parts"]}
    assert figures["environment"]["cuda_available"] is False
    assert figures["end_to_end"]["fp32 (SIGTERM, resume): stopped at"] == \
        figures["end_to_end"]["fp32 (SIGTERM, resume): resumed at"]
    assert 0 <= figures["end_to_end"]["k-NN top-1 (k=20)"] <= 100
    assert figures["throughput"]["loader keeps up (sparo)"].startswith(("yes (loader", "no (loader"))

    markdown = (report_dir / "gpu_report.md").read_text()
    assert "| part | status | time | key figures |" in markdown
    for number, title in enumerate(PART_TITLES, start=1):
        assert f"| {number}. {title} | pass |" in markdown
    # The summary table is what the check prints last.
    printed = completed.stdout.rstrip().splitlines()
    assert printed[-6:-4] == ["| part | status | time | key figures |", "|---|---|---|---|"]
    assert [line.split(" | ")[:2] for line in printed[-4:]] == \
        [[f"| {number}. {title}", "pass"] for number, title in enumerate(PART_TITLES, start=1)]
    assert any(line.startswith("result: pass") for line in printed)
