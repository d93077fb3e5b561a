"""Faults during pretraining, injected into the real main_dino.py: kill -9 (also in the middle of a checkpoint
write), preemption signals, a non-finite loss and unreadable image files."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from helpers import (
    TINY,
    assert_every_checkpoint_loads,
    environment,
    kill_tree,
    make_images,
    run,
    script,
    temporaries,
    tiny_config,
    wait_until,
)

import main_dino
from dino_sparo.errors import EXIT_PREEMPTED, run_cli
from dino_sparo.train import train_dino


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_and_mid_epoch_then_the_same_command_finishes(tmp_path):
    data = make_images(tmp_path / "data", count=16)
    out = tmp_path / "out"
    command = [*script("main_dino.py"), *TINY, "--data_path", data, "--output_dir", out, "--epochs", "3",
               "--log_freq", "1", "--saveckp_freq", "0"]

    # killed halfway through writing the first checkpoint (end of epoch 0): the temporary file is left half
    # written and no checkpoint.pth exists yet
    killed = run(command, timeout=180, env=environment(fault="kill:save=1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(temporaries(out)) == 1 and assert_every_checkpoint_loads(out) == []

    # the rerun starts afresh, removes the orphan, and is killed at the start of its 6th step (epoch 1,
    # iteration 1): checkpoint.pth is the complete one of epoch 0
    killed = run(command, timeout=180, env=environment(fault="kill:step=6"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "partial checkpoint file(s) left by an interrupted save" in killed.stdout
    assert [c["epoch"] for c in assert_every_checkpoint_loads(out)] == [1]
    assert temporaries(out) == []

    completed = run(command, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resumed from" in completed.stdout and "at epoch 1" in completed.stdout
    assert [c["epoch"] for c in assert_every_checkpoint_loads(out)] == [3]
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2]


@pytest.mark.slow
def test_sigterm_saves_the_current_iteration_and_the_rerun_resumes_there(tmp_path):
    data = make_images(tmp_path / "data", count=32)
    out = tmp_path / "out"
    # 8 batches of 4 per epoch, 2 per optimizer step (--accum_steps 2): 4 iterations per epoch
    command = [*script("main_dino.py"), *TINY, "--data_path", data, "--output_dir", out, "--epochs", "2",
               "--log_freq", "1", "--saveckp_freq", "0", "--num_workers", "2", "--accum_steps", "2"]
    # SIGTERM arrives during the 3rd optimizer step (iteration 2), to the whole process group as torchrun sends
    # it, so the DataLoader workers get it too: that step (both its micro-batches) completes, then the run stops
    # and saves: never between the micro-batches of a step.
    stopped = run(command, timeout=180, env=environment(fault="group:SIGTERM:step=3"))
    text = stopped.stdout + stopped.stderr
    assert stopped.returncode == EXIT_PREEMPTED, text[-3000:]
    assert "Traceback" not in text
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped: ")]
    assert lines == [f"stopped: preempted by SIGTERM at epoch 0, iteration 3: the state was saved to "
                     f"{out / 'checkpoint.pth'}; run the same command again to resume from there"]
    (checkpoint,) = assert_every_checkpoint_loads(out)
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["samples_done"]) == (0, 3, 24)
    assert not (out / "log.txt").exists() or (out / "log.txt").read_text() == ""  # no epoch finished

    completed = run(command, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "at epoch 0, iteration 3 of 4 (a preempted epoch)" in completed.stdout
    assert "Epoch: [0/2] [4/4]" in completed.stdout and "Epoch: [0/2] [3/4]" not in completed.stdout
    (final,) = assert_every_checkpoint_loads(out)
    assert final["epoch"] == 2 and "iteration" not in final
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]
    # the resumed epoch took the very steps of an uninterrupted run (crops, through 2 workers, stochastic depth and
    # the accumulated micro-batches)
    straight = run([*command[:command.index(out)], tmp_path / "straight", *command[command.index(out) + 1:]],
                   timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    for part in ("student", "teacher"):
        assert all(torch.equal(value, final[part][name]) for name, value in reference[part].items()), part


def test_non_finite_loss_stops_with_status_1_one_line_and_the_last_checkpoint_kept(tmp_path, capsys):
    """main_dino.py as run from the shell (its entry point under run_cli): a learning rate that sends the loss to
    inf ends the run at the first logging interval with exit status 1 and one line naming the epoch and iteration;
    the checkpoint of the last good epoch is left exactly as it was."""
    data = make_images(tmp_path / "data", count=8)
    out = tmp_path / "out"
    train_dino(tiny_config(data, out, "--epochs", "1"))
    before = (out / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as status:
        run_cli(lambda: main_dino.main([*TINY, "--data_path", str(data), "--output_dir", str(out), "--epochs", "2",
                                        "--lr", "1e30"]))
    assert status.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the loss became non-finite at epoch 1, iteration 1" in errors[0], errors
    assert (out / "checkpoint.pth").read_bytes() == before  # the last good state, untouched
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_corrupt_truncated_empty_and_non_image_files_are_skipped_and_counted(tmp_path, capsys):
    data = make_images(tmp_path / "data", count=12)
    good = (tmp_path / "data" / "000.png").read_bytes()
    bad = {"003_empty.png": b"", "005_truncated.png": good[: len(good) // 3], "007_text.jpg": b"not an image",
           "009_corrupt.jpg": b"\xff\xd8\xff\xe0" + os.urandom(200)}
    for name, payload in bad.items():
        (tmp_path / "data" / name).write_bytes(payload)
    result = train_dino(tiny_config(data, tmp_path / "out", "--epochs", "1"))  # 16 files, 4 batches: all visited
    assert result.epoch_stats[0]["skipped_images"] >= len(bad)
    captured = capsys.readouterr()
    for name in bad:
        assert f"skipping unreadable image {tmp_path / 'data' / name}" in captured.err
    assert f"skipped {result.epoch_stats[0]['skipped_images']} unreadable images" in captured.out
    logged = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[0])
    assert logged["skipped_images"] == result.epoch_stats[0]["skipped_images"]


@pytest.mark.slow
def test_submitit_requeues_a_preempted_run_which_resumes_mid_epoch(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import run_with_submitit

    # The job receives SIGTERM during its 3rd step, once (a requeued job runs clean), as from Slurm.
    for name, value in environment(fault="signal:SIGTERM:step=3", fault_once=str(tmp_path / "fired")).items():
        monkeypatch.setenv(name, value)
    data = make_images(tmp_path / "data", count=32)
    shared = tmp_path / "shared"
    job = run_with_submitit.main([*TINY, "--data_path", data, "--epochs", "1", "--log_freq", "1", "--saveckp_freq",
                                  "0", "--cluster", "local", "--ngpus", "0", "--nodes", "1", "--timeout", "10",
                                  "--cpus_per_task", "1", "--shared_dir", str(shared)])
    try:
        wait_until(job.done, 300, interval=0.5)
        job.result()  # raises if the requeued job failed
    finally:
        kill_tree(job._process.pid)
    stdout = job.stdout()
    assert "preempted by SIGTERM at epoch 0, iteration 3" in stdout and "requeuing" in stdout
    assert "at epoch 0, iteration 3 of 8 (a preempted epoch)" in stdout  # the requeued task resumed there
    assert "Epoch 0 done" in stdout
    # outputs went to the job's folder under --shared_dir
    checkpoint = torch.load(shared / str(job.job_id) / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and "iteration" not in checkpoint
