
"""SPARO slots: restriction, per-slot k-NN, and selection that uses the training set only."""
import argparse
import json
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import balanced, make_image_folder, one_line_error, spread, write_main_dino_checkpoint

import eval_knn
from dino_sparo.cli import slot_list
from dino_sparo.data.datasets import ImageDataset
from dino_sparo.data.transforms import eval_transform
from dino_sparo.errors import UserError
from dino_sparo.eval.knn import knn_classifier
from dino_sparo.eval.slot_stats import measure_slots
from dino_sparo.eval.slots import check_slots, holdout_mask, per_slot_knn, restrict_to_slots, select_slots
from dino_sparo.models import build_pretrained_backbone, vit_tiny

run_error = partial(one_line_error, eval_knn.main)  # its one-line error, after checking status 2

SMALL = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "32"]


def slot_problem(num_train=200, num_test=60, informative=(2, 5), num_slots=6, slot_dim=4, seed=0):
    """Encodings whose ``informative`` slots carry the class (more strongly for the first) and others noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, slot_dim, generator=generator)

    def encode(labels):
        slots = torch.randn(len(labels), num_slots, slot_dim, generator=generator)
        for strength, slot in zip((3.0, 1.0), informative):
            slots[:, slot] += strength * centres[labels]
        return F.normalize(F.normalize(slots, dim=2).flatten(1), dim=1)

    train_labels = torch.randint(0, 5, (num_train,), generator=generator)
    test_labels = torch.randint(0, 5, (num_test,), generator=generator)
    return encode(train_labels), train_labels, encode(test_labels), test_labels


def test_restrict_to_slots_is_the_renormalised_concatenation():
    features = torch.randn(3, 5 * 4)
    restricted = restrict_to_slots(features, [3, 0], slot_dim=4)
    expected = torch.cat([features[:, 12:16], features[:, 0:4]], dim=1)
    torch.testing.assert_close(restricted, expected / expected.norm(dim=1, keepdim=True))


def test_slot_parsing_and_range_errors_are_one_line():
    assert slot_list("3, 1,4") == [3, 1, 4]
    for text, message in (("-1", "indices >= 0"), ("a,b", "comma-separated slot indices"), ("1,1", "more than once"),
                          (",", "at least one")):
        with pytest.raises(argparse.ArgumentTypeError, match=message) as error:
            slot_list(text)
        assert "\n" not in str(error.value)
    assert check_slots([3, 5], 6) == [3, 5]
    with pytest.raises(UserError, match="--slots 6, 9 out of range: this model has 6 slots") as error:
        check_slots([3, 6, 9], 6)
    assert "\n" not in str(error.value)


def test_per_slot_knn_matches_knn_on_each_slice_and_is_sorted():
    train, train_labels, test, test_labels = slot_problem()
    scores = per_slot_knn(train, train_labels, test, test_labels, num_slots=6, slot_dim=4, k=10, T=0.07,
                          num_classes=5)
    assert sorted(s.slot for s in scores) == list(range(6))
    assert [s.top1 for s in scores] == sorted((s.top1 for s in scores), reverse=True)
    for score in scores:
        rows = slice(score.slot * 4, (score.slot + 1) * 4)
        expected = knn_classifier(F.normalize(train[:, rows], dim=1), train_labels,
                                  F.normalize(test[:, rows], dim=1), test_labels, 10, 0.07, 5)
        assert (score.top1, score.top5) == pytest.approx(expected)
    assert scores[0].slot == 2  # the strongly informative slot is best


def test_selection_finds_informative_slots_from_train_only():
    train, train_labels, _, _ = slot_problem()
    selection = select_slots(train, train_labels, count=2, num_slots=6, slot_dim=4, k=10, T=0.07, num_classes=5,
                             holdout_fraction=0.2, seed=0)
    assert selection.slots == [2, 5] and selection.holdout_size == 40
    assert len(selection.holdout_scores) == 6


def test_holdout_is_fixed_by_the_seed():
    assert torch.equal(holdout_mask(100, 0.1, seed=3), holdout_mask(100, 0.1, seed=3))
    assert not torch.equal(holdout_mask(100, 0.1, seed=3), holdout_mask(100, 0.1, seed=4))
    assert int(holdout_mask(100, 0.1, seed=3).sum()) == 10 and int(holdout_mask(2, 0.9, seed=0).sum()) == 1


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """Features of a tiny SPARO checkpoint on coloured images, dumped once by eval_knn.py."""
    root = tmp_path_factory.mktemp("slots")
    data = make_image_folder(str(root / "data"), {"train": balanced(10, 12), "val": spread(10, 37)}, contrast=8)
    checkpoint = str(root / "checkpoint.pth")
    write_main_dino_checkpoint(checkpoint)
    features = str(root / "features")
    eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", data, "--dump_features", features,
                   "--nb_knn", "20", *SMALL])
    return data, checkpoint, features


def test_slots_flag_evaluates_the_chosen_slots(dumped):
    _, checkpoint, features = dumped
    results = eval_knn.main(["--pretrained_weights", checkpoint, "--load_features", features, "--slots", "4,1",
                             "--nb_knn", "20"])
    train = torch.load(os.path.join(features, "trainfeat.pth"), weights_only=True)
    test = torch.load(os.path.join(features, "testfeat.pth"), weights_only=True)
    train_labels = torch.load(os.path.join(features, "trainlabels.pth"), weights_only=True)
    test_labels = torch.load(os.path.join(features, "testlabels.pth"), weights_only=True)
    expected = knn_classifier(restrict_to_slots(train, [4, 1], 16), train_labels,
                              restrict_to_slots(test, [4, 1], 16), test_labels, 20, 0.07, 10)
    assert (results["knn"]["20"]["top1"], results["knn"]["20"]["top5"]) == pytest.approx(expected)
    assert results["slots"] == [4, 1]


def test_selection_ignores_validation_labels(dumped, tmp_path):
    _, checkpoint, features = dumped
    shuffled = tmp_path / "shuffled"
    os.makedirs(shuffled)
    for name in ("trainfeat.pth", "testfeat.pth", "trainlabels.pth"):
        os.symlink(os.path.join(features, name), shuffled / name)
    test_labels = torch.load(os.path.join(features, "testlabels.pth"), weights_only=True)
    torch.save(test_labels[torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(1))],
               shuffled / "testlabels.pth")
    runs = {}
    for name, directory in (("original", features), ("shuffled", str(shuffled))):
        eval_knn.main(["--pretrained_weights", checkpoint, "--load_features", directory, "--select_slots", "3",
                       "--per_slot", "--nb_knn", "20", "--output_dir", str(tmp_path / name)])
        with open(tmp_path / name / "knn_slot_selection.json") as handle:
            runs[name] = json.load(handle)
    assert runs["original"]["selected"] == runs["shuffled"]["selected"]
    assert runs["original"]["holdout_scores"] == runs["shuffled"]["holdout_scores"]
    assert len(runs["original"]["selected"]) == 3
    # ...while the validation accuracies reported next to the selection did see the labels change.
    assert runs["original"]["val_all_slots"] != runs["shuffled"]["val_all_slots"]
    with open(tmp_path / "original" / "knn_per_slot.json") as handle:
        per_slot = json.load(handle)
    assert sorted(s["slot"] for s in per_slot["slots"]) == list(range(6))


def test_slot_flags_errors(dumped, tmp_path, capsys):
    _, checkpoint, features = dumped
    assert "--slots 6 out of range: this model has 6 slots" in one_line_error(eval_knn.main,
        ["--pretrained_weights", checkpoint, "--load_features", features, "--slots", "3,6"], capsys)
    assert "between 1 and the number of slots (6)" in one_line_error(eval_knn.main,
        ["--pretrained_weights", checkpoint, "--load_features", features, "--select_slots", "7"], capsys)
    assert "exclude each other" in one_line_error(eval_knn.main,
        ["--pretrained_weights", checkpoint, "--load_features", features, "--slots", "1", "--select_slots", "2"],
        capsys)
    cls_checkpoint = tmp_path / "cls.pth"
    torch.save(vit_tiny(patch_size=8, depth=3, readout="cls").state_dict(), cls_checkpoint)
    assert "--per_slot needs an encoding made of slots" in one_line_error(eval_knn.main,
        ["--pretrained_weights", str(cls_checkpoint), "--load_features", features, "--per_slot"], capsys)


def test_slot_outputs_go_beside_the_checkpoint_without_output_dir(dumped, tmp_path, monkeypatch, capsys):
    _, checkpoint, features = dumped
    monkeypatch.chdir(tmp_path)
    eval_knn.main(["--pretrained_weights", checkpoint, "--load_features", features, "--per_slot", "--nb_knn", "20"])
    beside = os.path.join(os.path.dirname(checkpoint), "knn_per_slot.json")
    assert os.listdir(tmp_path) == []  # nothing written where the command happened to run
    assert os.path.isfile(beside) and f"written {beside}" in capsys.readouterr().out


def test_per_slot_reports_the_slot_statistics_on_val(dumped, tmp_path):
    data, checkpoint, _ = dumped
    results = eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", data, "--per_slot", "--nb_knn", "20",
                             "--output_dir", str(tmp_path), *SMALL])
    model, _ = build_pretrained_backbone(checkpoint, "teacher", {}, verbose=False)
    val = ImageDataset(os.path.join(data, "val"), eval_transform(32, 32))
    expected = measure_slots(model, [torch.stack([val[i][0] for i in range(len(val))])], "cpu")
    written = json.loads((tmp_path / "knn_per_slot.json").read_text())
    assert written["statistics"] == pytest.approx({"images": 37, **expected.summary()}, abs=1e-5)
    for row in written["slots"]:
        assert row["peakedness"] == pytest.approx(float(expected.peakedness[row["slot"]]), abs=1e-5)
    assert results["per_slot"] == written
