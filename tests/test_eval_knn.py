
"""eval_knn.py end to end on small image folders and a checkpoint in main_dino.py's format."""
import json
import os
from functools import partial

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, balanced, make_image_folder, one_line_error, spread, write_main_dino_checkpoint

import eval_knn
from dino_sparo.data.datasets import ImageDataset
from dino_sparo.data.transforms import eval_transform
from dino_sparo.eval.knn import knn_classifier
from dino_sparo.models import vit_tiny

run_error = partial(one_line_error, eval_knn.main)  # its one-line error, after checking status 2

SMALL = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "16"]


@pytest.fixture(scope="module")
def data_and_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    data = make_image_folder(str(root / "data"), {"train": balanced(10, 12), "val": spread(10, 37)}, contrast=8)
    one = make_image_folder(str(root / "one"), {"train": balanced(10, 12), "val": {3: 1}}, contrast=8)
    checkpoint = str(root / "checkpoint.pth")
    write_main_dino_checkpoint(checkpoint)
    return data, one, checkpoint


def run_ok(argv):
    return eval_knn.main(argv)


def check_against_dumped_features(results, directory, ks):
    """The reported accuracies equal knn_classifier's on the features the run extracted."""
    train = torch.load(os.path.join(directory, "trainfeat.pth"), weights_only=True)
    test = torch.load(os.path.join(directory, "testfeat.pth"), weights_only=True)
    train_labels = torch.load(os.path.join(directory, "trainlabels.pth"), weights_only=True)
    test_labels = torch.load(os.path.join(directory, "testlabels.pth"), weights_only=True)
    torch.testing.assert_close(train.norm(dim=1), torch.ones(len(train)))
    for k in ks:
        expected = knn_classifier(train, train_labels, test, test_labels, k, 0.07, num_classes=10)
        assert (results["knn"][str(k)]["top1"], results["knn"][str(k)]["top5"]) == pytest.approx(expected)
    return train, test, train_labels, test_labels


@pytest.fixture(scope="module")
def teacher_run(data_and_checkpoint, tmp_path_factory):
    """eval_knn.py on 37 val images of 10 classes, with its features dumped."""
    data, _, checkpoint = data_and_checkpoint
    directory = str(tmp_path_factory.mktemp("teacher_features"))
    results = run_ok(["--pretrained_weights", checkpoint, "--data_path", data, "--dump_features", directory,
                      "--nb_knn", "10", "20", "200", *SMALL])
    return results, directory


def test_knn_on_37_test_images_and_10_classes(teacher_run):
    results, directory = teacher_run
    assert results["num_classes"] == 10
    train, test, train_labels, test_labels = check_against_dumped_features(results, directory, (10, 20, 200))
    assert train.shape == (120, 6 * 16) and test.shape == (37, 96)
    assert sorted(train_labels.tolist()) == sorted(list(range(10)) * 12) and len(test_labels) == 37
    assert results["knn"]["20"]["top1"] > 30  # colour separates the classes: far above the 10% of chance


def test_knn_on_one_test_image_of_a_val_with_one_class(data_and_checkpoint, tmp_path):
    _, one, checkpoint = data_and_checkpoint
    results = run_ok(["--pretrained_weights", checkpoint, "--data_path", one, "--dump_features", str(tmp_path),
                      *SMALL])
    _, _, _, test_labels = check_against_dumped_features(results, tmp_path, (10, 20, 100, 200))
    assert test_labels.tolist() == [3]  # val's only class keeps train's index
    assert results["num_classes"] == 10


def test_student_key_and_official_dino_format(data_and_checkpoint, teacher_run, tmp_path, capsys):
    data, _, checkpoint = data_and_checkpoint
    student = run_ok(["--pretrained_weights", checkpoint, "--checkpoint_key", "student", "--data_path", data,
                      *SMALL, "--nb_knn", "20", "--dump_features", str(tmp_path / "student")])
    teacher_features = torch.load(os.path.join(teacher_run[1], "trainfeat.pth"), weights_only=True)
    student_features = torch.load(tmp_path / "student" / "trainfeat.pth", weights_only=True)
    assert not torch.allclose(teacher_features, student_features)  # the student's weights were evaluated
    check_against_dumped_features(student, tmp_path / "student", (20,))
    # An official-style DINO checkpoint: CLS ViT, prefixed keys, no saved args, depth read from the weights.
    model = vit_tiny(patch_size=8, depth=3, readout="cls")
    official = tmp_path / "dino_deitsmall8_pretrain_full_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "student": {f"module.backbone.{k}": v for k, v in model.state_dict().items()}}, official)
    capsys.readouterr()
    results = run_ok(["--pretrained_weights", str(official), "--data_path", data, "--nb_knn", "20", *SMALL,
                      "--dump_features", str(tmp_path / "official")])
    out = capsys.readouterr().out
    assert "CLS read-out" in out and "readout=cls" in out and "depth=3" in out  # read from the weights
    assert "arch=vit_tiny" in out and "patch_size=8" in out
    train, _, _, _ = check_against_dumped_features(results, tmp_path / "official", (20,))
    images = torch.stack([eval_transform(32, 32)(image) for image, _ in ImageDataset(os.path.join(data, "train"))])
    with torch.no_grad():  # the CLS read-out of the model the checkpoint holds
        torch.testing.assert_close(train, F.normalize(model.eval()(images), dim=1), atol=1e-5, rtol=1e-4)
    # Asking for SPARO on it would evaluate a random read-out: refused, saying what is missing.
    err = run_error(["--pretrained_weights", str(official), "--data_path", data, "--readout", "sparo", *SMALL], capsys)
    assert "does not hold weights for this architecture" in err and "missing sparo.*" in err


def test_bad_inputs_are_one_line_errors(data_and_checkpoint, tmp_path, capsys):
    data, _, checkpoint = data_and_checkpoint
    assert "checkpoint not found" in run_error(["--pretrained_weights", str(tmp_path / "nope.pth"),
                                                "--data_path", data], capsys)
    err = run_error(["--pretrained_weights", checkpoint, "--data_path", data, *SMALL, "--sparo_slots", "8"], capsys)
    assert "shape" in err and "sparo" in err
    os.makedirs(tmp_path / "noval" / "train" / "a")
    assert "val not found" in run_error(["--pretrained_weights", checkpoint, "--data_path",
                                         str(tmp_path / "noval"), *SMALL], capsys)
    assert "multiple of the patch size" in run_error(["--pretrained_weights", checkpoint, "--data_path", data,
                                                       "--resize_size", "36", "--crop_size", "36"], capsys)
    assert "or --load_features" in run_error(["--pretrained_weights", checkpoint], capsys)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(data_and_checkpoint, tmp_path):
    data, _, checkpoint = data_and_checkpoint
    argv = ["--pretrained_weights", checkpoint, "--data_path", data, *SMALL, "--per_slot", "--select_slots", "2"]
    single = run_ok([*argv, "--output_dir", str(tmp_path / "one")])
    completed = helpers.run(  # own process group, killed as a whole: no orphaned workers
        [*helpers.TORCHRUN, "--nproc_per_node", "2", os.path.join(ROOT, "eval_knn.py"), *argv,
         "--output_dir", str(tmp_path / "two")], timeout=240)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "2 process(es)" in completed.stdout
    for k, scores in single["knn"].items():
        assert f"{k}-NN classifier result: Top1: {scores['top1']}, Top5: {scores['top5']}" in completed.stdout
    for name in ("knn_per_slot.json", "knn_slot_selection.json"):
        with open(tmp_path / "one" / name) as one, open(tmp_path / "two" / name) as two:
            assert json.load(one) == json.load(two)


@pytest.mark.slow
def test_torchrun_attribute_matrix_and_selection_match_one_process(data_and_checkpoint, tmp_path):
    """Each rank holds its own shard of the attribute labels too: two processes give the one-process files."""
    import csv

    from dino_sparo.data.images import images_under

    data, _, checkpoint = data_and_checkpoint
    table = tmp_path / "attributes.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "hue", "parity", "index"])
        paths = images_under(os.path.join(data, "train")) + images_under(os.path.join(data, "val"))
        for number, path in enumerate(paths):
            label = int(os.path.basename(os.path.dirname(path))[-2:])
            writer.writerow([os.path.relpath(path, data), label, label % 2, number % 13])
    argv = ["--pretrained_weights", checkpoint, "--data_path", data, *SMALL, "--nb_knn", "10", "20", "--per_slot",
            "--attributes", str(table), "--attribute_columns", "hue,parity,index", "--select_slots", "2",
            "--select_for", "parity"]
    run_ok([*argv, "--output_dir", str(tmp_path / "one")])
    completed = helpers.run(
        [*helpers.TORCHRUN, "--nproc_per_node", "2", os.path.join(ROOT, "eval_knn.py"), *argv,
         "--output_dir", str(tmp_path / "two")], timeout=240)
    assert completed.returncode == 0, completed.stderr[-2000:]
    for name in ("knn_attributes.json", "knn_slot_attributes.json", "knn_slot_selection_for_parity.json"):
        with open(tmp_path / "one" / name) as one, open(tmp_path / "two" / name) as two:
            assert json.load(one) == json.load(two)


def test_k_and_temperature_sweep_from_one_feature_extraction(data_and_checkpoint, tmp_path, monkeypatch, capsys):
    from dino_sparo.eval import features

    data, _, checkpoint = data_and_checkpoint
    extractions = []
    real_extract = features.extract_dataset_features
    monkeypatch.setattr(features, "extract_dataset_features",
                        lambda *args, **kwargs: extractions.append(1) or real_extract(*args, **kwargs))
    results = run_ok(["--pretrained_weights", checkpoint, "--data_path", data, *SMALL, "--nb_knn", "10", "20",
                      "--temperature", "0.07", "0.5", "--output_dir", str(tmp_path), "--dump_features",
                      str(tmp_path / "features")])
    assert len(extractions) == 2  # train and val, once for all four (k, T)
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "knn.json").read_text())
    assert saved["sweep"] == results["knn_sweep"] and saved["val_images"] == 37 and saved["train_images"] == 120
    assert [(row["k"], row["temperature"]) for row in saved["sweep"]] == [(10, 0.07), (20, 0.07), (10, 0.5),
                                                                          (20, 0.5)]
    train, test, train_labels, test_labels = check_against_dumped_features(results, tmp_path / "features", (10, 20))
    for row in saved["sweep"]:
        expected = knn_classifier(train, train_labels, test, test_labels, row["k"], row["temperature"], 10)
        assert (row["top1"], row["top5"]) == pytest.approx(expected)
        label = "" if row["temperature"] == 0.07 else " (T=0.5)"
        assert f"{row['k']}-NN classifier result{label}: Top1: {row['top1']}, Top5: {row['top5']}" in out
    assert results["temperature"] == 0.07  # the first: DINO's output lines and results["knn"]
    assert "--temperature must be positive, got -1" in run_error(
        ["--pretrained_weights", checkpoint, "--data_path", data, *SMALL, "--temperature", "0.07", "-1"], capsys)
