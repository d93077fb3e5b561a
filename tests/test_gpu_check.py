"""scripts/gpu_check.sh, the GPU acceptance check: its CPU dry run passes and reports every part, on a machine
without CUDA the plain command says so in one line and does nothing else, the check itself never imports torch,
its training figures come from log.txt, and benchmark rows reach the report while the benchmark still runs."""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from benchmarks.processes import wait_until

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PART_TITLES = ("environment", "CUDA tests", "end to end", "pretraining speed", "throughput")
NO_CUDA_LINE = "no CUDA device: nothing to check; use --dry-run to exercise the script on CPU"
CHECK_MODULES = ("cli", "cuda_tests", "end_to_end", "environment", "plan", "pretraining_speed", "report",
                 "supervisor", "throughput", "training_log")


def load(module: str) -> ModuleType:
    """``gpu_check.<module>`` from scripts/ (what scripts/gpu_check.sh puts on the path; not an installed package)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module(f"gpu_check.{module}")


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


def test_the_check_itself_imports_no_torch():
    code = "import sys; " + "; ".join(f"import gpu_check.{module}" for module in CHECK_MODULES) + \
        "; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT)])}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                               timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


def test_a_report_folder_holding_other_files_is_refused(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "precious.txt").write_text("keep me")
    completed = run_check(["--dry-run", str(tmp_path / "report")], tmp_path / "scratch", timeout=120)
    assert completed.returncode != 0 and completed.stderr.startswith("error: ") and \
        len(completed.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "report") == ["precious.txt"]


@pytest.mark.parametrize("module, args", [("images", ["photos", "/nowhere", "0", "5"]), ("images", []),
                                          ("probe", ["checkpoint"]), ("probe", ["bogus"])])
def test_the_helpers_refuse_bad_arguments_in_one_line(module, args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT)])}
    completed = subprocess.run([sys.executable, "-m", f"gpu_check.{module}", *args], capture_output=True, text=True,
                               cwd=ROOT, env=env, timeout=60)
    assert completed.returncode == 2 and completed.stderr.startswith("usage: ")
    assert len(completed.stderr.strip().splitlines()) == 1


def make_check(tmp_path: Path, parts: list) -> Any:
    supervisor, plan = load("supervisor"), load("plan")
    (tmp_path / "report" / "logs").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    return supervisor.Check(tmp_path / "report", tmp_path / "work", plan.dry_run_plan(), parts, "test")


def write_log(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def test_training_figures_come_from_log_txt(tmp_path):
    report, end_to_end, training_log = load("report"), load("end_to_end"), load("training_log")
    part = report.Part(3, "end_to_end", "end to end", "proves", 60)
    check = make_check(tmp_path, [part])
    facts = {"precision": "fp32", "device": "cpu", "augment_device": "cpu", "world_size": 1}
    resumed = {**facts, "resumed_from_epoch": 1, "resumed_from_iteration": 4}
    run = write_log(tmp_path / "run", [{"epoch": 0, "images_per_s": 10.0, **facts},
                                       {"epoch": 1, "images_per_s": 30.0, **resumed},
                                       {"epoch": 2, "images_per_s": 20.0, **resumed}])
    end_to_end.record_training(check, part, run, "fp32", "run")
    assert part.problems == []
    assert part.figures == {"run: precision and device": "fp32 on cpu", "run: images/s (median)": 20.0}
    log = training_log.TrainingLog.read(run)
    assert log.resumed_at() == (1, 4) and log.median("images_per_s", skip_first=True) == 25.0

    # Another precision than asked for is a problem; an epoch missing is one too.
    end_to_end.record_training(check, part, write_log(tmp_path / "bf16", [{"epoch": 0, **facts, "precision": "bf16",
                                                                           "images_per_s": 5.0}]), "fp32", "bf16")
    assert any("expected each of 0-2 once" in problem for problem in part.problems)
    assert any("ran with bf16 on cpu, expected fp32 on cpu" in problem for problem in part.problems)

    # An older main_dino.py that records neither: said so, not a crash or a problem.
    older = report.Part(3, "end_to_end", "end to end", "proves", 60)
    end_to_end.record_training(check, older, write_log(tmp_path / "old", [{"epoch": e} for e in range(3)]), "fp32",
                               "old")
    assert older.problems == []
    assert older.figures["old: precision and device"] == ("precision not recorded in log.txt on device not "
                                                          "recorded in log.txt")
    assert older.figures["old: images/s (median)"] == training_log.NOT_RECORDED
    assert training_log.TrainingLog.read(tmp_path / "nowhere").resumed_at() is None

    write_log(tmp_path / "mixed", [{"epoch": 0, "device": "cpu"}, {"epoch": 1, "device": "cuda:0"}])
    with pytest.raises(ValueError, match="disagree on device"):
        training_log.TrainingLog.read(tmp_path / "mixed").fact("device")


ROWS_SCRIPT = """
import json, os, sys, time
path, rows = sys.argv[1], json.loads(sys.argv[2])
with open(path + ".tmp", "w") as handle:
    json.dump({"rows": rows}, handle)
os.replace(path + ".tmp", path)  # as benchmarks.run: atomically
time.sleep(300)
"""
LOADER_ROW = {"bench": "loader", "config": "tiny", "mode": "uint8", "workers": 2, "images_per_s": 123.0}


def test_benchmark_rows_reach_the_report_while_it_runs_and_a_reserved_timeout_is_information(tmp_path):
    report, throughput = load("report"), load("throughput")
    part = report.Part(5, "throughput", "throughput", "proves", 60)
    check = make_check(tmp_path, [part])
    rows_path = check.logs_dir / "5_fake.json"
    measured = throughput.Throughput(part)
    command = [sys.executable, "-c", ROWS_SCRIPT, rows_path, json.dumps([LOADER_ROW])]
    finished = []
    runner = threading.Thread(target=lambda: finished.append(check.step(
        part, "fake", command, 6, watch=throughput.new_rows(rows_path, measured.add_loader_rows), reserved=True)))
    runner.start()
    try:
        def in_report() -> bool:
            path = check.report_dir / "gpu_report.json"
            return path.exists() and "loader (uint8) 123 img/s" in path.read_text()

        wait_until(in_report, timeout=30, interval=0.05)
        assert runner.is_alive()  # streamed while the command was still running
    finally:
        runner.join(timeout=60)
    step = finished[0]
    assert step.status == "timeout" and step.informational
    assert part.settle() == "pass" and part.problems == []
    assert any("information, not a failure" in note for note in part.notes)
    assert part.figures["loader uint8 (2 workers, tiny)"] == "123 img/s"

    # The same time-out in an ordinary command times the part out.
    plain = report.Part(5, "throughput", "throughput", "proves", 60)
    check.step(plain, "slow", [sys.executable, "-c", "import time; time.sleep(300)"], 5)
    assert plain.settle() == "timeout" and "killed after its time limit" in plain.problems[0]


@pytest.mark.slow
def test_dry_run_passes_every_part_and_writes_both_reports(tmp_path):
    report_dir, scratch = tmp_path / "report", tmp_path / "scratch"
    completed = run_check(["--dry-run", str(report_dir)], scratch, timeout=400)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-3000:]

    report = json.loads((report_dir / "gpu_report.json").read_text())
    assert report["result"] == "pass" and report["mode"] == "dry run (CPU)"
    assert [part["title"] for part in report["parts"]] == list(PART_TITLES)
    for part in report["parts"]:
        assert part["status"] == "pass", part
        assert 0 < part["seconds"] <= part["limit_s"] + 5
        for step in part["steps"]:
            assert (report_dir / step["log"]).is_file()
    # Only the report and the logs: data, checkpoints and runs went to a temporary folder, removed.
    assert sorted(os.listdir(report_dir)) == ["gpu_report.json", "gpu_report.md", "logs"]
    assert not [name for name in os.listdir(scratch) if name.startswith("dino_sparo_gpu_check_")]

    figures = {part["key"]: part["figures"] for part in report["parts"]}
    assert figures["environment"]["cuda_available"] is False
    assert figures["environment"]["usable_cores"] >= 1 and "c_compiler" in figures["environment"]
    end_to_end = figures["end_to_end"]
    assert end_to_end["fp32 (SIGTERM, resume): stopped at"] == end_to_end["fp32 (SIGTERM, resume): resumed at"]
    assert end_to_end["fp32 (SIGTERM, resume): precision and device"] == "fp32 on cpu"
    assert end_to_end["fp32: images/s (median)"] > 0
    assert 0 <= end_to_end["k-NN top-1 (k=20)"] <= 100 and 0 <= end_to_end["linear top-1 (1 epoch)"] <= 100
    speed = figures["pretraining_speed"]
    assert speed["epochs completed"] >= 1 and speed["first epoch: images/s"] > 0
    assert speed["first epoch: data-wait share"].endswith("%") and speed["augmentation device"] == "cpu"
    throughput = next(part for part in report["parts"] if part["key"] == "throughput")
    assert figures["throughput"]["loader keeps up (sparo)"].startswith(("yes (loader", "no (loader"))
    compiled = next(step for step in throughput["steps"] if step["name"] == "train_compiled")
    assert compiled["informational"] and compiled["status"] in ("pass", "timeout")
    if compiled["status"] == "timeout":
        assert any("train_compiled" in note and "information" in note for note in throughput["notes"])
    else:
        assert "step sparo fast fp32 compiled" in figures["throughput"]

    markdown = (report_dir / "gpu_report.md").read_text()
    assert "| part | status | time | key figures |" in markdown
    for number, title in enumerate(PART_TITLES, start=1):
        assert f"| {number}. {title} | pass |" in markdown
    # The summary table is what the check prints last.
    printed = completed.stdout.rstrip().splitlines()
    assert printed[-7:-5] == ["| part | status | time | key figures |", "|---|---|---|---|"]
    assert [line.split(" | ")[:2] for line in printed[-5:]] == \
        [[f"| {number}. {title}", "pass"] for number, title in enumerate(PART_TITLES, start=1)]
    assert any(line.startswith("result: pass") for line in printed)
