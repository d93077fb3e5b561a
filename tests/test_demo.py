import os
import re
import sys

import pytest

from faultkit import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*flags, timeout=240):
    return run([sys.executable, os.path.join(ROOT, "main_dino.py"), *map(str, flags)], timeout=timeout)


@pytest.mark.slow
def test_demo_runs_end_to_end_at_reduced_size(tmp_path):
    data, out = tmp_path / "demo", tmp_path / "run"
    completed = run_main("--demo", "--demo_data_dir", data, "--demo_num_images", 96, "--epochs", 1,
                         "--batch_size_per_gpu", 16, "--num_workers", 0, "--output_dir", out)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(os.listdir(data)) == ["attributes.csv", "info.json", "train", "val"]
    assert re.search(r"k-NN top-1 on .*val.*random init \d+\.\d%\s+->\s+trained teacher \d+\.\d%", completed.stdout)
    assert (out / "checkpoint.pth").is_file() and (out / "log.txt").is_file()


def test_missing_data_path_is_a_one_line_error(tmp_path):
    completed = run_main("--data_path", tmp_path / "nowhere", "--output_dir", tmp_path / "out", timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip() == f"error: data path not found: {tmp_path / 'nowhere'}"
