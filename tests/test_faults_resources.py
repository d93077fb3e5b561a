"""Running out of a resource in the middle of pretraining, injected into the real main_dino.py at a counted
checkpoint write or step: a full disk, an output folder deleted or made read-only, and a CUDA out-of-memory
error. Each ends with one ``error:`` line and exit status 2, and leaves the last complete checkpoint as it was."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from helpers import TINY, assert_every_checkpoint_loads, environment, make_images, run, script, temporaries

from dino_sparo.errors import EXIT_USER_ERROR


def one_error_line(completed) -> str:
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, completed.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("fault, reason", [
    ("enospc", "no space left in {out} to write checkpoint.pth ("),
    ("readonly", "the output folder {out} is not writable any more (Read-only file system)"),
    ("rmdir", "the output folder {out} was deleted while checkpoint.pth was being written"),
], ids=["disk_full", "read_only", "folder_deleted"])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, fault, reason):
    data = make_images(tmp_path / "data", count=8)
    out = tmp_path / "out"
    command = [*script("main_dino.py"), *TINY, "--data_path", data, "--output_dir", out, "--epochs", "3",
               "--saveckp_freq", "0"]
    # the 1st write is epoch 0's checkpoint.pth, the 2nd (which fails) epoch 1's
    failed = run(command, timeout=180, env=environment(fault=f"{fault}:save=2"))
    assert failed.returncode == EXIT_USER_ERROR, failed.stderr[-3000:]
    error = one_error_line(failed)
    assert error.startswith(f"error: {reason.format(out=out)}"), error
    assert "any previous checkpoint.pth is unchanged" in error
    if fault == "rmdir":  # the previous checkpoint went with the folder; nothing was recreated
        assert not out.exists()
        return
    if fault == "enospc":
        needed = re.search(r"\((\d+\.\d) MiB needed, \d+\.\d MiB free\)", error)
        assert needed and abs(float(needed.group(1)) - os.path.getsize(out / "checkpoint.pth") / 2**20) < 0.2
    assert temporaries(out) == []
    assert [c["epoch"] for c in assert_every_checkpoint_loads(out)] == [1]
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    if fault == "readonly":
        return

    completed = run(command, timeout=180)  # space freed: the same command resumes from epoch 1
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resumed from" in completed.stdout and "at epoch 1" in completed.stdout
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1, 2]


@pytest.mark.slow
def test_out_of_memory_in_a_step_names_the_batch_crops_precision_and_flags(tmp_path):
    data = make_images(tmp_path / "data", count=8)
    out = tmp_path / "out"
    failed = run([*script("main_dino.py"), *TINY, "--data_path", data, "--output_dir", out, "--epochs", "2",
                  "--precision", "fp32"], timeout=180, env=environment(fault="oom:step=3"))
    assert failed.returncode == EXIT_USER_ERROR, failed.stderr[-3000:]
    error = one_error_line(failed)
    assert error.startswith("error: out of memory in the training step at epoch 1, iteration 0 on cpu"), error
    for fact in ("batch 4 per process", "2 global crops of 32 px", "2 local crops of 16 px", "precision fp32",
                 "--batch_size_per_gpu", "--local_crops_number", "--global_crop_size", "--local_crop_size",
                 "--precision bf16"):
        assert fact in error, (fact, error)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1  # epoch 0's, untouched
