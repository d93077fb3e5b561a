"""The scripts together, as a user chains them: the demo (main_dino.py --demo) at reduced size writes a
checkpoint, and eval_knn.py, eval_linear.py and visualize_sparo.py take it as it is, architecture read from its
saved args."""
import json
import os
import re

import pytest
import torch
from helpers import run, script
from PIL import Image


def run_script(name, *flags, timeout=300):
    completed = run([*script(name), *flags], timeout=timeout)
    assert completed.returncode == 0, f"{name} failed:\n{completed.stderr[-3000:]}"
    assert "Traceback" not in completed.stderr
    return completed.stdout


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data, out = root / "demo", root / "run"
    stdout = run_script("main_dino.py", "--demo", "--demo_data_dir", data, "--demo_num_images", 128, "--epochs", 2,
                        "--batch_size_per_gpu", 16, "--num_workers", 0, "--output_dir", out)
    return data, out / "checkpoint.pth", stdout


@pytest.mark.slow
def test_demo_generates_its_data_trains_and_reports_knn_before_and_after(pretrained):
    data, checkpoint, stdout = pretrained
    assert sorted(os.listdir(data)) == ["attributes.csv", "info.json", "train", "val"]
    assert re.search(r"k-NN top-1 on .*val.*random init \d+\.\d%\s+->\s+trained teacher \d+\.\d%", stdout)
    log = [json.loads(line) for line in (checkpoint.parent / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]


@pytest.mark.slow
def test_eval_knn_reads_the_architecture_from_a_main_dino_checkpoint(pretrained, tmp_path):
    data, checkpoint, _ = pretrained
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 2 and saved["args"]["readout"] == "sparo"
    stdout = run_script("eval_knn.py", "--pretrained_weights", checkpoint, "--data_path", data,
                        "--resize_size", 36, "--crop_size", 32, "--nb_knn", 5, 20, "--num_workers", 0,
                        "--per_slot", "--output_dir", tmp_path)
    assert re.search(r"20-NN classifier result: Top1: \d+\.\d+", stdout), stdout[-2000:]
    per_slot = json.loads((tmp_path / "knn_per_slot.json").read_text())
    assert len(per_slot["slots"]) == saved["args"]["sparo_slots"]


@pytest.mark.slow
def test_eval_linear_trains_on_a_main_dino_checkpoint(pretrained, tmp_path):
    data, checkpoint, _ = pretrained
    run_script("eval_linear.py", "--pretrained_weights", checkpoint, "--data_path", data, "--resize_size", 36,
               "--crop_size", 32, "--epochs", 1, "--batch_size_per_gpu", 64, "--num_workers", 0,
               "--output_dir", tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert log and "epoch" in log[-1]
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_visualize_sparo_draws_the_slots_of_a_main_dino_checkpoint(pretrained, tmp_path):
    data, checkpoint, _ = pretrained
    run_script("visualize_sparo.py", "--pretrained_weights", checkpoint, "--images", data / "val",
               "--max_images", 3, "--top_slots", 4, "--image_size", 64, "--tile_size", 64, "--device", "cpu",
               "--output_dir", tmp_path)
    width, height = Image.open(tmp_path / "slots.png").size
    assert width > 3 * 64 and height > 4 * 64
    assert len(json.loads((tmp_path / "summary.json").read_text())["slots"]) == 4
