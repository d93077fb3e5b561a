"""Faults during pretraining, injected into the real main_dino.py: kill -9 (also in the middle of a checkpoint
write), preemption signals, a non-finite loss and unreadable image files."""
from __future__ import annotations

import glob
import json
import os
import signal

import pytest
import torch

from dino_sparo.preemption import EXIT_PREEMPTED
from dino_sparo.train import train_dino
import run_with_submitit
from faultkit import ROOT, kill_tree, read, run, script, started, wait_until
from test_train import TINY, make_images, tiny_args


def temporaries(out) -> list[str]:
    return glob.glob(os.path.join(out, ".checkpoint*.tmp-*"))


def assert_every_checkpoint_loads(out) -> list[dict]:
    """Every checkpoint file on disk is complete: it loads with weights_only=True and holds a full state."""
    loaded = []
    for path in sorted(glob.glob(os.path.join(out, "checkpoint*.pth"))):
        checkpoint = torch.load(path, weights_only=True)
        assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(checkpoint), path
        loaded.append(checkpoint)
    return loaded


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_and_mid_epoch_then_the_same_command_finishes(tmp_path):
    data = make_images(tmp_path / "data", count=16)
    out, log = tmp_path / "out", str(tmp_path / "run.log")
    # A wide head makes each save take long enough to be caught half-written.
    command = [*script("main_dino.py"), *TINY, "--data_path", data, "--output_dir", out, "--epochs", "3",
               "--out_dim", "65536", "--log_freq", "1", "--saveckp_freq", "0"]

    with started(command, log_path=log) as process:  # killed while the first checkpoint is being written
        wait_until(lambda: temporaries(out), 180, process, interval=0.001)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    leftovers = temporaries(out)
    checkpoints = assert_every_checkpoint_loads(out)
    assert leftovers or checkpoints  # either the kill landed mid-write or just after the rename

    with started(command, log_path=log) as process:  # killed in the middle of the second epoch
        wait_until(lambda: "Epoch: [1/3] [1/4]" in read(log), 180, process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert [c["epoch"] for c in assert_every_checkpoint_loads(out)] == [1]
    if leftovers:
        assert "partial checkpoint file(s) left by an interrupted save" in read(log)

    completed = run(command, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resumed from" in completed.stdout and "at epoch 1" in completed.stdout
    assert [c["epoch"] for c in assert_every_checkpoint_loads(out)] == [3]
    assert temporaries(out) == []
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs[-2:] == [1, 2]


@pytest.mark.slow
def test_sigterm_saves_the_current_iteration_and_the_rerun_resumes_there(tmp_path):
    data = make_images(tmp_path / "data", count=32)
    out, log = tmp_path / "out", str(tmp_path / "run.log")
    command = [*script("main_dino.py"), *TINY, "--data_path", data, "--output_dir", out, "--epochs", "2",
               "--log_freq", "1", "--saveckp_freq", "0"]
    with started(command, log_path=log) as process:
        wait_until(lambda: "Epoch: [0/2] [2/8]" in read(log), 180, process)
        process.send_signal(signal.SIGTERM)  # to the training process only, as Slurm or torchrun would
        process.wait(timeout=120)
    text = read(log)
    assert process.returncode == EXIT_PREEMPTED, text[-3000:]
    assert "Traceback" not in text
    stopped = [line for line in text.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "preempted by SIGTERM at epoch 0, iteration" in stopped[0]
    assert "run the same command again to resume" in stopped[0]
    (checkpoint,) = assert_every_checkpoint_loads(out)
    assert checkpoint["epoch"] == 0 and 2 <= checkpoint["iteration"] < 8
    assert f"iteration {checkpoint['iteration']}" in stopped[0]
    assert not (out / "log.txt").exists() or (out / "log.txt").read_text() == ""  # no epoch finished

    completed = run(command, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"at epoch 0, iteration {checkpoint['iteration']} of 8 (a preempted epoch)" in completed.stdout
    first_line = f"Epoch: [0/2] [{checkpoint['iteration'] + 1}/8]"
    assert first_line in completed.stdout  # picks up at the next iteration, not at the start of the epoch
    (final,) = assert_every_checkpoint_loads(out)
    assert final["epoch"] == 2 and "iteration" not in final
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path):
    data = make_images(tmp_path / "data", count=8)
    out = tmp_path / "out"
    train_dino(tiny_args(data, out, "--epochs", "1"))
    before = (out / "checkpoint.pth").read_bytes()
    completed = run([*script("main_dino.py"), *TINY, "--data_path", data, "--output_dir", out, "--epochs", "2",
                     "--lr", "1e30"], timeout=180)
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the loss became non-finite at epoch 1, iteration" in errors[0]
    assert (out / "checkpoint.pth").read_bytes() == before  # the last good state, untouched
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_corrupt_truncated_empty_and_non_image_files_are_skipped_and_counted(tmp_path, capsys):
    data = make_images(tmp_path / "data", count=12)
    good = (tmp_path / "data" / "000.png").read_bytes()
    bad = {"003_empty.png": b"", "005_truncated.png": good[: len(good) // 3], "007_text.jpg": b"not an image",
           "009_corrupt.jpg": b"\xff\xd8\xff\xe0" + os.urandom(200)}
    for name, payload in bad.items():
        (tmp_path / "data" / name).write_bytes(payload)
    result = train_dino(tiny_args(data, tmp_path / "out", "--epochs", "1"))  # 16 files, 4 batches: all visited
    assert result.epoch_stats[0]["skipped_images"] >= len(bad)
    captured = capsys.readouterr()
    for name in bad:
        assert f"skipping unreadable image {tmp_path / 'data' / name}" in captured.err
    assert f"skipped {result.epoch_stats[0]['skipped_images']} unreadable images" in captured.out
    logged = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[0])
    assert logged["skipped_images"] == result.epoch_stats[0]["skipped_images"]


@pytest.mark.slow
def test_submitit_requeues_a_preempted_run_which_resumes_mid_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    data = make_images(tmp_path / "data", count=32)
    shared = tmp_path / "shared"
    job = run_with_submitit.main([*TINY, "--data_path", data, "--epochs", "1", "--log_freq", "1", "--saveckp_freq",
                                  "0", "--cluster", "local", "--ngpus", "0", "--nodes", "1", "--timeout", "10",
                                  "--cpus_per_task", "1", "--shared_dir", str(shared)])
    try:
        wait_until(lambda: "Epoch: [0/1] [2/8]" in (job.stdout() or ""), 180, interval=0.2)
        job._process.send_signal(signal.SIGTERM)  # the local controller forwards it to the task, as Slurm would
        wait_until(job.done, 300, interval=0.5)
        job.result()  # raises if the requeued job failed
    finally:
        kill_tree(job._process.pid)
    stdout = job.stdout()
    assert "preempted by SIGTERM at epoch 0, iteration" in stdout and "requeuing" in stdout
    assert "(a preempted epoch)" in stdout  # the requeued task resumed inside epoch 0
    checkpoint = torch.load(shared / str(job.job_id) / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and "iteration" not in checkpoint
