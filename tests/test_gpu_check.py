"""scripts/gpu_check.sh, the GPU acceptance check, tested as a harness: its commands are stubbed (the commands
themselves, main_dino.py, the evaluations, the benchmarks, are tested elsewhere), so that the tests see in seconds
what it reports, which files it leaves (four), how it keeps to its time caps, ``--parts``, a SIGTERM to the check
and one to a training run after its loop. On a machine without CUDA the plain command says so in one line and does
nothing else; the check itself never imports torch.

Run as a script, this module is the stub: the interpreter the check runs its commands with (``PYTHON``).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benchmarks.processes import wait_until

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PART_TITLES = ("environment", "CUDA tests", "end to end", "pretraining speed", "throughput")
REPORT_FILES = ["console.log", "gpu_report.json", "gpu_report.md", "logs.tgz"]
NO_CUDA_LINE = "no CUDA device: nothing to check; use --dry-run to exercise the script on CPU"
CHECK_MODULES = ("cli", "cuda_tests", "end_to_end", "environment", "plan", "pretraining_speed", "report",
                 "supervisor", "throughput", "training_log")
STUB_PREEMPTION_WAIT_S = 1.0  # how long a fresh stub training run waits for a SIGTERM after its first progress line


# ------------------------------------------------------------------------------------------------------- the stub
def flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


def flag_values(argv: list[str], name: str) -> list[str]:
    if name not in argv:
        return []
    values = []
    for value in argv[argv.index(name) + 1:]:
        if value.startswith("--"):
            break
        values.append(value)
    return values


def stub_main_dino(argv: list[str]) -> int:
    """main_dino.py as the check sees it: a progress line with img/s, then (in a fresh output folder) a moment
    in which a SIGTERM stops it mid-epoch with its position saved (exit 3), else every epoch logged to log.txt; a
    rerun resumes from the saved position. STUB_SETUP=hang: it waits before any of that, STUB_AFTER_LOOP=hang
    after it, both without a handler of SIGTERM."""
    if os.environ.get("STUB_SETUP") == "hang":
        time.sleep(60)
    out = Path(flag(argv, "--output_dir"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pth"  # here the position alone, as JSON (the stubbed probe reads it)
    resumed = json.loads(checkpoint.read_text()) if checkpoint.exists() else None
    facts = {"precision": flag(argv, "--precision", "fp32"), "device": flag(argv, "--device"), "augment_device":
             flag(argv, "--device"), "world_size": 1}
    print(f"NCCL_DEBUG={os.environ.get('NCCL_DEBUG')}")
    print("Epoch: [0]  [ 2/16]  loss: 6.9  img/s: 100.0", flush=True)
    if resumed is None:
        stopped = []
        signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
        deadline = time.monotonic() + STUB_PREEMPTION_WAIT_S
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.01)
        if stopped:
            checkpoint.write_text(json.dumps({"epoch": 0, "iteration": 2}))
            print("stopped: preempted", flush=True)
            return 3
    else:
        facts.update(resumed_from_epoch=resumed["epoch"], resumed_from_iteration=resumed["iteration"])
    with open(out / "log.txt", "a") as log:
        for epoch in range(resumed["epoch"] if resumed else 0, int(flag(argv, "--epochs"))):
            log.write(json.dumps({"epoch": epoch, "images_per_s": 100.0 + epoch, "data_wait_share": 0.1,
                                  **facts}) + "\n")
    checkpoint.write_text(json.dumps({"epoch": int(flag(argv, "--epochs")), "iteration": 0}))
    if os.environ.get("STUB_AFTER_LOOP") == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(60)
    return 0


def stub_benchmarks(argv: list[str]) -> int:
    """benchmarks.run: the rows of each benchmark asked for, written to --json atomically."""
    rows = []
    if "loader" in flag_values(argv, "--bench"):
        rows += [{"bench": "loader", "config": "stub", "mode": mode, "workers": 2, "images_per_s": 50.0}
                 for mode in ("pil", "uint8")]
    if "train" in flag_values(argv, "--bench"):
        modes = [("fast", False)] + [("fast", True)] * ("--compile" in argv)
        modes = [("baseline", False)] * (flag(argv, "--baseline") != "false") + modes
        rows += [{"bench": "train_step", "readout": readout, "mode": mode, "precision": "fp32", "compile": compiled,
                  "images_per_s": 10.0 * (index + 1), "peak_mib": 100.0, "skipped_steps": 0}
                 for readout in flag_values(argv, "--readout") for index, (mode, compiled) in enumerate(modes)]
    path = Path(flag(argv, "--json"))
    path.with_suffix(".tmp").write_text(json.dumps({"rows": rows}))
    os.replace(path.with_suffix(".tmp"), path)
    return 0


def stub_module(argv: list[str]) -> int:
    module, args = argv[0], argv[1:]
    if module == "gpu_check.probe" and args == ["machine"]:
        print(json.dumps({"cpu": "stub CPU", "cpu_cores": 2, "usable_cores": 2, "c_compiler": "cc (stub)",
                          "triton": None, "torch": "stub", "cuda_available": False}))
    elif module == "gpu_check.probe":
        print(Path(args[1]).read_text())
    elif module == "gpu_check.images":
        folders = [Path(args[1]) / split / "class_0" for split in ("train", "val")] if args[0] == "classes" else \
            [Path(args[1])]
        for folder in folders:
            folder.mkdir(parents=True)
    elif module == "pytest":
        if os.environ.get("STUB_PYTEST") == "hang":
            time.sleep(60)
        print("15 skipped, 6 deselected in 0.50s")
    elif module == "torch.distributed.run":
        return stub_main_dino(args[args.index("main_dino.py") + 1:])
    elif module == "benchmarks.run":
        return stub_benchmarks(args)
    else:
        raise SystemExit(f"the stub has no {module}")
    return 0


def stub_script(argv: list[str]) -> int:
    script, args = argv[0], argv[1:]
    if script == "main_dino.py":
        return stub_main_dino(args)
    if script == "eval_knn.py":
        for k in (10, 20):
            print(f"{k}-NN classifier result: Top1: 60.0, Top5: 100.0")
    elif script == "eval_linear.py":
        Path(flag(args, "--output_dir")).mkdir(parents=True)
        (Path(flag(args, "--output_dir")) / "log.txt").write_text(json.dumps({"epoch": 0, "best_acc": 55.0}) + "\n")
    elif script == "visualize_sparo.py":
        Path(flag(args, "--output_dir")).mkdir(parents=True)
        for name in ("slots.png", "heads.png"):
            (Path(flag(args, "--output_dir")) / name).touch()
    else:
        raise SystemExit(f"the stub has no {script}")
    return 0


def stub_main(argv: list[str]) -> int:
    """The check itself and ``-c`` code run for real; every command of the parts is answered by the stub."""
    if argv[:2] == ["-m", "gpu_check"] or argv[:1] == ["-c"]:
        os.execv(sys.executable, [sys.executable, *argv])
    return stub_module(argv[1:]) if argv[0] == "-m" else stub_script(argv)


@pytest.fixture
def stub_python(tmp_path) -> Path:
    """An executable that runs this module as the stub, for ``PYTHON``."""
    path = tmp_path / "python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{__file__}" "$@"\n')
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------------- helpers
def load(module: str) -> ModuleType:
    """``gpu_check.<module>`` from scripts/ (what scripts/gpu_check.sh puts on the path; not an installed package)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module(f"gpu_check.{module}")


def check_environment(scratch: Path, python: Path | None = None, **extra: str) -> dict[str, str]:
    """The script with ``python`` (this interpreter by default), temporary files under ``scratch`` and no bytecode
    written, so that nothing lands outside the test's folder."""
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "PYTHON": str(python or sys.executable), "TMPDIR": str(scratch),
            "PYTHONDONTWRITEBYTECODE": "1", **extra}


def run_check(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """The script; on a time-out the check gets SIGTERM, on which it kills its commands (they run in sessions of
    their own) and writes its report, before the test fails."""
    process = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"the check ran over {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def archived_logs(report_dir: Path) -> dict[str, str]:
    with tarfile.open(report_dir / "logs.tgz") as archive:
        return {member.name: archive.extractfile(member).read().decode() for member in archive.getmembers()
                if member.isfile()}


def make_check(tmp_path: Path, parts: list, plan: Any = None) -> Any:
    supervisor = load("supervisor")
    (tmp_path / "report").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    return supervisor.Check(tmp_path / "report", tmp_path / "work", plan or load("plan").dry_run_plan(), parts,
                            "test")


def write_log(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


# ---------------------------------------------------------------------------------------------------- the tests
def test_without_cuda_the_check_says_so_in_one_line_and_exits_0(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real check would run")
    report_dir = tmp_path / "report"
    completed = run_check([str(report_dir)], check_environment(tmp_path / "scratch"), timeout=120)
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


@pytest.mark.parametrize("args, message", [(["--parts", "2,bogus"], "unknown part 'bogus'"),
                                           (["--parts", ","], "names no part"),
                                           (["--parts", "6"], "unknown part '6'")])
def test_bad_parts_and_a_report_folder_holding_other_files_are_refused_in_one_line(tmp_path, args, message):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "precious.txt").write_text("keep me")
    env = check_environment(tmp_path / "scratch")
    for arguments, expected in ((["--dry-run", *args, str(tmp_path / "report")], message),
                                (["--dry-run", str(tmp_path / "report")], "holds precious.txt")):
        completed = run_check(arguments, env, timeout=60)
        assert completed.returncode != 0 and completed.stderr.startswith("error: ") and expected in completed.stderr
        assert len(completed.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "report") == ["precious.txt"]


@pytest.mark.parametrize("module, args", [("images", ["photos", "/nowhere", "0", "5"]), ("images", []),
                                          ("probe", ["checkpoint"]), ("probe", ["bogus"])])
def test_the_helpers_refuse_bad_arguments_in_one_line(module, args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT)])}
    completed = subprocess.run([sys.executable, "-m", f"gpu_check.{module}", *args], capture_output=True, text=True,
                               cwd=ROOT, env=env, timeout=60)
    assert completed.returncode == 2 and completed.stderr.startswith("usage: ")
    assert len(completed.stderr.strip().splitlines()) == 1


def test_the_caps_add_up_to_the_window_and_every_command_fits_its_part():
    plan, cli = load("plan"), load("cli")
    assert tuple(key for key, *_ in cli.PARTS) == plan.PART_KEYS
    gpu = plan.gpu_plan()
    assert gpu.total_limit_s() == sum(gpu.part_limits_s.values()) + gpu.compile_reserve_s <= 7 * 60
    for mode in (gpu, plan.dry_run_plan()):
        assert tuple(mode.part_limits_s) == tuple(mode.step_limits_s) == plan.PART_KEYS
        for key, limits in mode.step_limits_s.items():
            assert max(limits.values()) <= mode.part_limits_s[key], (mode.mode, key)
        assert mode.total_limit_s(("environment", "end_to_end")) == \
            mode.part_limits_s["environment"] + mode.part_limits_s["end_to_end"]  # no reserve without throughput
        assert mode.speed_run.stop_after_s < mode.step_limits_s["pretraining_speed"]["main_dino"]


def test_a_stubbed_dry_run_passes_every_part_and_leaves_only_its_four_files(tmp_path, stub_python):
    report_dir, scratch = tmp_path / "report", tmp_path / "scratch"
    completed = run_check(["--dry-run", str(report_dir)], check_environment(scratch, stub_python), timeout=120)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-3000:]
    assert sorted(os.listdir(report_dir)) == REPORT_FILES  # a machine that hands back few files gets them all
    assert not [name for name in os.listdir(scratch) if name.startswith("dino_sparo_gpu_check_")]

    report = json.loads((report_dir / "gpu_report.json").read_text())
    assert report["result"] == "pass" and report["mode"] == "dry run (CPU)"
    assert report["elapsed_s"] <= report["time_limit_s"] == load("plan").dry_run_plan().total_limit_s()
    assert [part["title"] for part in report["parts"]] == list(PART_TITLES)
    logs = archived_logs(report_dir)
    for part in report["parts"]:
        assert part["status"] == "pass", part
        assert 0 < part["seconds"] <= part["limit_s"]
        for step in part["steps"]:
            assert step["log"] in logs and logs[step["log"]].startswith("$ "), step
    assert {"logs/5_loader.json", "logs/5_train.json", "logs/5_train_compiled.json"} <= set(logs)
    pytest_command = logs["logs/2_pytest.log"].splitlines()[0]
    assert "-rfEs --tb=short" in pytest_command and "tests/test_cuda.py" in pytest_command
    assert "tests/test_models.py" not in pytest_command  # only modules that mark tests cuda are collected
    assert "NCCL_DEBUG=WARN" in logs["logs/3_pretrain_fp32_preempted.log"]

    figures = {part["key"]: part["figures"] for part in report["parts"]}
    assert figures["environment"]["cpu"] == "stub CPU"
    end_to_end = figures["end_to_end"]
    assert end_to_end["fp32 (SIGTERM, resume): stopped at"] == end_to_end["fp32 (SIGTERM, resume): resumed at"] == \
        "epoch 0, iteration 2"
    assert end_to_end["k-NN top-1 (k=20)"] == 60.0 and end_to_end["linear top-1 (1 epoch)"] == 55.0
    assert figures["pretraining_speed"]["later epochs: images/s (median)"] == 101.0
    assert figures["throughput"]["step sparo fast fp32 compiled"].startswith("20.0 img/s")

    printed = completed.stdout.rstrip().splitlines()
    assert (report_dir / "console.log").read_text().rstrip().splitlines() == printed
    # The summary table is what the check prints last.
    assert printed[-7:-5] == ["| part | status | time | key figures |", "|---|---|---|---|"]
    assert [line.split(" | ")[:2] for line in printed[-5:]] == \
        [[f"| {number}. {title}", "pass"] for number, title in enumerate(PART_TITLES, start=1)]
    assert "| part | status | time | key figures |" in (report_dir / "gpu_report.md").read_text()


def test_parts_runs_only_the_selected_parts_within_their_caps(tmp_path, stub_python):
    report_dir = tmp_path / "report"
    completed = run_check(["--dry-run", "--parts", "1,pretraining_speed", str(report_dir)],
                          check_environment(tmp_path / "scratch", stub_python), timeout=60)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((report_dir / "gpu_report.json").read_text())
    assert [part["status"] for part in report["parts"]] == \
        ["pass", "not selected", "not selected", "pass", "not selected"]
    assert report["result"] == "pass" and not report["parts"][1]["steps"]
    caps = load("plan").dry_run_plan().part_limits_s
    assert report["time_limit_s"] == caps["environment"] + caps["pretraining_speed"]
    assert sorted(os.listdir(report_dir)) == REPORT_FILES
    assert "| 3. end to end | not selected |" in (report_dir / "gpu_report.md").read_text()


def test_a_sigterm_to_the_check_ends_its_command_and_leaves_the_report_and_logs(tmp_path, stub_python):
    report_dir = tmp_path / "report"
    env = check_environment(tmp_path / "scratch", stub_python, STUB_PYTEST="hang")
    process = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", str(report_dir)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def in_the_cuda_tests() -> bool:
            console = report_dir / "console.log"
            return console.exists() and "[2/5] CUDA tests" in console.read_text()

        wait_until(in_the_cuda_tests, timeout=60, process=process, interval=0.05)
        time.sleep(0.5)  # the stubbed pytest is running
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    report = json.loads((report_dir / "gpu_report.json").read_text())
    assert [part["status"] for part in report["parts"]] == ["pass", "fail", "skipped", "skipped", "skipped"]
    assert "interrupted by SIGTERM" in report["parts"][1]["problems"][-1]
    assert sorted(os.listdir(report_dir)) == REPORT_FILES and "logs/2_pytest.log" in archived_logs(report_dir)
    assert stdout.rstrip().splitlines()[-1].startswith("| 5. throughput | skipped |")


def test_a_sigterm_after_the_training_loop_is_not_a_missing_epoch(tmp_path, stub_python):
    """The pretraining-speed run gets SIGTERM after a fixed time: one that lands once every epoch ran, when
    main_dino.py no longer stops on it, ends the process by the signal, yet the figures in log.txt stand. A run
    stopped by it before any epoch has none."""
    report, speed, plan = load("report"), load("pretraining_speed"), load("plan")
    dry = plan.dry_run_plan()
    quick = dataclasses.replace(dry, speed_run=dataclasses.replace(dry.speed_run,
                                                                   stop_after_s=2 * STUB_PREEMPTION_WAIT_S))
    part = report.Part(4, "pretraining_speed", "pretraining speed", "proves", 60)
    check = make_check(tmp_path / "after_loop", [part], quick)
    check.python = str(stub_python)
    check.env["STUB_AFTER_LOOP"] = "hang"
    speed.check_pretraining_speed(check, part)
    assert part.steps[-1].returncode == -signal.SIGTERM
    assert part.problems == [] and part.settle() == "pass"
    assert any("after the training loop had ended" in note for note in part.notes)
    assert part.figures["epochs completed"] == dry.speed_run.epochs

    part = report.Part(4, "pretraining_speed", "pretraining speed", "proves", 60)
    check = make_check(tmp_path / "during_setup", [part], quick)
    check.python = str(stub_python)
    check.env["STUB_SETUP"] = "hang"
    speed.check_pretraining_speed(check, part)
    assert part.steps[-1].returncode == -signal.SIGTERM
    assert part.problems == ["no epoch within 2 s: the SIGTERM then ended main_dino.py before its training loop "
                             "began"]


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
        part, "fake", command, 5, watch=throughput.new_rows(rows_path, measured.add_loader_rows), reserved=True)))
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
    assert "logs/5_fake.json" in archived_logs(check.report_dir)

    # The same time-out in an ordinary command times the part out.
    plain = report.Part(5, "throughput", "throughput", "proves", 60)
    check.step(plain, "slow", [sys.executable, "-c", "import time; time.sleep(300)"], 5)
    assert plain.settle() == "timeout" and "killed after its time limit" in plain.problems[0]


if __name__ == "__main__":
    sys.exit(stub_main(sys.argv[1:]))
