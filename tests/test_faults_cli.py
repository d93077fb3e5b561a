"""Bad command lines and untrusted checkpoints: each is one ``error: ...`` line and exit status 2, never a
traceback, and nothing already on disk is touched."""
from __future__ import annotations

import ast
import os
import sys

import pytest
import torch
from helpers import ROOT, TINY, balanced, make_image_folder, one_line_error, run, script, write_main_dino_checkpoint

import eval_knn
import eval_linear
import main_dino
import visualize_sparo
from dino_sparo.errors import run_cli

EVAL_SMALL = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "8"]


class RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_faults")
    paths = {"root": root, "checkpoint": str(root / "checkpoint.pth"), "data": str(root / "data"),
             "marker": str(root / "code_ran")}
    write_main_dino_checkpoint(paths["checkpoint"])
    make_image_folder(paths["data"], {"train": balanced(2, 4), "val": balanced(2, 2)})
    make_image_folder(str(root / "no_val"), {"train": balanced(2, 2)})
    make_image_folder(str(root / "no_train"), {"val": balanced(2, 2)})
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder")
    (root / "text.pth").write_text("this is not a checkpoint")
    (root / "zero.pth").write_bytes(b"")
    with open(paths["checkpoint"], "rb") as handle:
        (root / "truncated.pth").write_bytes(handle.read()[:2000])
    torch.save({"teacher": {"cls_token": torch.zeros(1)}, "payload": RunsCode(paths["marker"])},
               str(root / "malicious.pth"))
    bad = root / "all_bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.jpg").write_text("hello")
    (bad / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return paths


def train_main(argv):
    sys.argv = ["main_dino.py", *argv]
    main_dino.main()


def fmt(argv, files):
    return [arg.format(**files) for arg in argv]


@pytest.mark.parametrize("argv, message", [
    (["--data_path", ""], "no data given"),
    (["--data_path", "{root}/nowhere"], "data path not found"),
    (["--data_path", "{root}/a_file"], "data path is not a folder"),
    (["--data_path", "{root}/empty"], "no images found"),
    (["--data_path", "{root}/all_bad"], "none of the 3 image files"),
    (["--data_path", "{data}/train", "--output_dir", "{root}/a_file/out"], "cannot be written: Not a directory"),
    (["--data_path", "{data}/train", "--output_dir", "{root}/a_file"], "cannot be written"),
    (["--data_path", "{data}/train", "--knn_data_path", "{root}/no_val"], "has no val/ folder"),
    (["--data_path", "{data}/train", "--init_from", "{root}/text.pth"], "not a readable PyTorch checkpoint"),
    (["--data_path", "{data}/train", "--init_from", "{checkpoint}", "--init_from_key", "bogus"],
     "keys holding weights: dino_loss, student, teacher"),
    (["--data_path", "{data}/train", "--sparo_slots", "0"], None),  # argparse's own usage error
])
def test_main_dino_bad_command_lines(files, argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", sys.argv)
    argv = [*TINY, "--output_dir", str(tmp_path / "out"), *fmt(argv, files)]
    if message is None:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: train_main(argv))
        assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err
        return
    assert message in one_line_error(train_main, argv, capsys)


def test_resume_refuses_other_architecture_and_unreadable_checkpoints(files, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", sys.argv)
    out = tmp_path / "out"
    out.mkdir()
    with open(files["checkpoint"], "rb") as handle:
        original = handle.read()
    (out / "checkpoint.pth").write_bytes(original)  # patch 8, 6 slots of 16; TINY asks for 16, 4 of 8
    argv = [*TINY, "--data_path", f"{files['data']}/train", "--output_dir", str(out)]
    error = one_line_error(train_main, argv, capsys)
    assert "other architecture flags" in error
    assert "--patch_size 8 (this run: 16)" in error and "--sparo_slots 6 (this run: 4)" in error
    assert (out / "checkpoint.pth").read_bytes() == original  # untouched
    (out / "checkpoint.pth").write_bytes(original[:3000])
    assert "is not a readable PyTorch checkpoint" in one_line_error(train_main, argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--data_path", ""], "give --data_path"),
    (["--data_path", "{root}/nowhere"], "is not a directory"),
    (["--data_path", "{root}/no_val"], "val not found"),
    (["--data_path", "{root}/no_train"], "train not found"),
    (["--pretrained_weights", "{root}/missing.pth"], "checkpoint not found"),
    (["--pretrained_weights", "{root}/text.pth"], "not a readable PyTorch checkpoint"),
    (["--pretrained_weights", "{root}/zero.pth"], "not a readable PyTorch checkpoint"),
    (["--pretrained_weights", "{root}/truncated.pth"], "not a readable PyTorch checkpoint"),
    (["--pretrained_weights", "{root}/malicious.pth"], "refusing to load"),
    (["--checkpoint_key", "bogus"], "has no key 'bogus'; keys holding weights: dino_loss, student, teacher"),
    (["--arch", "vit_small"], "does not match the backbone architecture: cls_token has shape (1, 1, 192) in the "
                              "checkpoint but (1, 1, 384) in the model"),
    (["--sparo_slots", "4"], "sparo.queries has shape (6, 64) in the checkpoint but (4, 64) in the model"),
    (["--slots", "0,99"], "--slots 99 out of range: this model has 6 slots"),
    (["--per_slot", "--output_dir", "{root}/a_file/out"], "--output_dir {root}/a_file/out cannot be written"),
    (["--dump_features", "{root}/a_file/feats"], "--dump_features {root}/a_file/feats cannot be written"),
])
def test_eval_knn_bad_command_lines(files, argv, message, capsys):
    base = ["--pretrained_weights", files["checkpoint"], "--data_path", files["data"], *EVAL_SMALL]
    assert fmt([message], files)[0] in one_line_error(eval_knn.main, base + fmt(argv, files), capsys)
    assert not os.path.exists(files["marker"])


@pytest.mark.parametrize("argv, message", [
    (["--output_dir", "{root}/a_file/out"], "cannot be written"),
    (["--data_path", "{root}/no_val"], "val not found"),
    (["--pretrained_weights", "{root}/malicious.pth"], "refusing to load"),
    (["--evaluate", "--linear_weights", "{root}/malicious.pth"], "refusing to load"),
    (["--checkpoint_key", "student_ema"], "keys holding weights: dino_loss, student, teacher"),
])
def test_eval_linear_bad_command_lines(files, argv, message, capsys):
    base = ["--pretrained_weights", files["checkpoint"], "--data_path", files["data"], *EVAL_SMALL, "--epochs", "1",
            "--output_dir", str(files["root"] / "linear")]
    assert message in one_line_error(eval_linear.main, base + fmt(argv, files), capsys)
    assert not os.path.exists(files["marker"])


@pytest.mark.parametrize("argv, message", [
    (["--output_dir", "{root}/a_file/viz"], "cannot be written"),
    (["--pretrained_weights", "{root}/malicious.pth"], "refusing to load"),
    (["--slots", "7"], "--slots 7 out of range"),
    (["--images", "{root}/all_bad"], "could be read"),
])
def test_visualize_bad_command_lines(files, argv, message, capsys):
    base = ["--pretrained_weights", files["checkpoint"], "--images", f"{files['data']}/val", "--image_size", "32",
            "--device", "cpu", "--output_dir", str(files["root"] / "viz")]
    argv = fmt(argv, files)
    if "--images" in argv:
        base = base[:2] + base[4:]
    assert message in one_line_error(visualize_sparo.main, base + argv, capsys)
    assert not os.path.exists(files["marker"])


def test_resume_and_init_from_refuse_a_checkpoint_that_runs_code(files, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", sys.argv)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((files["root"] / "malicious.pth").read_bytes())
    argv = [*TINY, "--data_path", f"{files['data']}/train", "--output_dir", str(out)]
    assert "refusing to load" in one_line_error(train_main, argv, capsys)
    argv = [*TINY, "--data_path", f"{files['data']}/train", "--output_dir", str(tmp_path / "fresh"),
            "--init_from", str(files["root"] / "malicious.pth")]
    assert "refusing to load" in one_line_error(train_main, argv, capsys)
    assert not os.path.exists(files["marker"])


def test_every_torch_load_is_weights_only():
    """Static check over the package and the scripts: each ``torch.load`` call passes weights_only=True."""
    sources = [os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")]
    for folder, _, names in os.walk(os.path.join(ROOT, "dino_sparo")):
        sources += [os.path.join(folder, name) for name in names if name.endswith(".py")]
    calls = 0
    for path in sources:
        with open(path) as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                flags = {kw.arg: ast.unparse(kw.value) for kw in node.keywords}
                assert flags.get("weights_only") == "True", f"{path}:{node.lineno} torch.load without weights_only"
    assert calls >= 1


@pytest.mark.slow
@pytest.mark.parametrize("name, argv, message", [
    ("main_dino.py", ["--data_path", "{data}/train", "--output_dir", "{root}/a_file/out"], "cannot be written"),
    ("eval_knn.py", ["--pretrained_weights", "{checkpoint}", "--data_path", "{data}", "--checkpoint_key", "x"],
     "keys holding weights"),
    ("visualize_sparo.py", ["--pretrained_weights", "{root}/malicious.pth", "--images", "{data}"],
     "refusing to load"),
])
def test_real_scripts_print_one_line_and_exit_2(files, name, argv, message):
    completed = run([*script(name), *fmt(argv, files)], timeout=120)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.count("\n") == 1 and completed.stderr.startswith("error: ")
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not os.path.exists(files["marker"])


def test_unreadable_files_are_skipped_by_the_evaluation(files, tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "data"), {"train": balanced(2, 4), "val": balanced(2, 2)})
    (tmp_path / "data" / "train" / "class_00" / "zero.png").write_bytes(b"")
    (tmp_path / "data" / "val" / "class_01" / "text.jpg").write_text("not an image")
    results = eval_knn.main(["--pretrained_weights", files["checkpoint"], "--data_path", data, *EVAL_SMALL,
                             "--nb_knn", "1"])
    # each unreadable file was replaced by the next readable image, with that image's label: the colours still
    # separate the classes (chance: 50%)
    assert results["knn"]["1"]["top1"] >= 75
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "zero.png" in err and "text.jpg" in err
