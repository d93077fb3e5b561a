"""The scripts together, as a user chains them: the demo (``python main_dino.py --demo``, the one real process here)
at reduced size writes a checkpoint, and eval_knn.py, eval_linear.py and visualize_sparo.py take it as it is,
architecture read from its saved args (called through their entry points in this process)."""
import json
import os
import re

import pytest
import torch
from helpers import run, script
from PIL import Image

import eval_knn
import eval_linear
import visualize_sparo

pytestmark = pytest.mark.slow
EVAL_VIEW = ["--resize_size", "36", "--crop_size", "32", "--num_workers", "0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data, out = root / "demo", root / "run"
    completed = run([*script("main_dino.py"), "--demo", "--demo_data_dir", data, "--demo_num_images", 128,
                     "--epochs", 2, "--batch_size_per_gpu", 16, "--num_workers", 0, "--output_dir", out], timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    return data, out / "checkpoint.pth", completed.stdout


def test_demo_generates_its_data_trains_and_reports_knn_before_and_after(pretrained):
    data, checkpoint, stdout = pretrained
    assert sorted(os.listdir(data)) == ["attributes.csv", "info.json", "train", "val"]
    line = re.search(r"k-NN top-1 on .*val \(colour classes, k=20\): random init (\d+\.\d)%\s+->\s+trained teacher "
                     r"(\d+\.\d)%", stdout)
    assert line, stdout[-2000:]
    log = [json.loads(entry) for entry in (checkpoint.parent / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]
    # the demo's k-NN is eval_knn.py's: the same teacher, view and k give the same score
    results = eval_knn.main(["--pretrained_weights", str(checkpoint), "--data_path", str(data), "--nb_knn", "20",
                             "--resize_size", "37", "--crop_size", "32", "--num_workers", "0"])
    assert results["knn"]["20"]["top1"] == pytest.approx(float(line.group(2)), abs=0.05)


def test_eval_knn_reads_the_architecture_from_a_main_dino_checkpoint(pretrained, tmp_path):
    data, checkpoint, _ = pretrained
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 2 and saved["args"]["readout"] == "sparo"
    results = eval_knn.main(["--pretrained_weights", str(checkpoint), "--data_path", str(data), "--nb_knn", "5",
                             "20", "--per_slot", "--output_dir", str(tmp_path), *EVAL_VIEW])
    assert set(results["knn"]) == {"5", "20"}
    per_slot = json.loads((tmp_path / "knn_per_slot.json").read_text())
    assert len(per_slot["slots"]) == saved["args"]["sparo_slots"]


def test_eval_linear_trains_on_a_main_dino_checkpoint(pretrained, tmp_path):
    data, checkpoint, _ = pretrained
    results = eval_linear.main(["--pretrained_weights", str(checkpoint), "--data_path", str(data), "--lr", "0.001",
                                "--epochs", "1", "--batch_size_per_gpu", "64", "--output_dir", str(tmp_path),
                                *EVAL_VIEW])
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0] and log[0]["test_acc1"] == results["best_acc"]
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1


def test_visualize_sparo_draws_the_slots_of_a_main_dino_checkpoint(pretrained, tmp_path):
    data, checkpoint, _ = pretrained
    summary = visualize_sparo.main(["--pretrained_weights", str(checkpoint), "--images", str(data / "val"),
                                    "--max_images", "3", "--top_slots", "4", "--image_size", "64", "--tile_size", "64",
                                    "--device", "cpu", "--output_dir", str(tmp_path)])
    width, height = Image.open(tmp_path / "slots.png").size
    assert width > 3 * 64 and height > 4 * 64
    assert len(summary["slots"]) == 4 and json.loads((tmp_path / "summary.json").read_text())["slots"] == \
        summary["slots"]
