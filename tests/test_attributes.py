
"""Attribute label sets (--attributes), the slot x attribute matrix (--per_slot) and selection for one attribute
(--select_slots K --select_for ATTR), checked against independent computations on the dumped features."""
import csv
import json
import os
from functools import partial

import numpy as np
import pytest
import torch
from helpers import balanced, make_image_folder, one_line_error, spread, write_main_dino_checkpoint
from PIL import Image

import eval_knn
from dino_sparo.data.images import images_under
from dino_sparo.eval.attributes import quantile_bins
from dino_sparo.eval.knn import knn_classifier
from dino_sparo.eval.slot_matrix import SlotAttributeMatrix
from dino_sparo.models.readouts import restrict_to_slots

run_error = partial(one_line_error, eval_knn.main)  # its one-line error, after checking status 2

SMALL = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "16"]
COLUMNS = ["hue", "brightness", "parity", "noise"]


def write_csv(path, rows, header=("path", *COLUMNS)):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SPARO checkpoint (6 slots of 16), a CLS one, coloured images and a CSV of four attributes: the class
    hue, the mean brightness (numeric, binned), the hue's parity and a random label."""
    root = tmp_path_factory.mktemp("attributes")
    data = make_image_folder(str(root / "data"), {"train": balanced(10, 12), "val": spread(10, 37)}, contrast=8)
    checkpoint, cls_checkpoint = str(root / "checkpoint.pth"), str(root / "cls.pth")
    write_main_dino_checkpoint(checkpoint)
    write_main_dino_checkpoint(cls_checkpoint, readout="cls")
    rng = np.random.default_rng(0)
    rows = []
    for split in ("train", "val"):
        for path in images_under(os.path.join(data, split)):
            label = int(os.path.basename(os.path.dirname(path))[-2:])
            rows.append([os.path.relpath(path, data), f"hue{label}", f"{np.asarray(Image.open(path)).mean():.3f}",
                         str(label % 2), str(rng.choice(["a", "b", "c"]))])
    table = write_csv(root / "attributes.csv", rows)
    features = str(root / "features")
    out = root / "out"
    results = eval_knn.main(["--pretrained_weights", checkpoint, "--data_path", data, "--dump_features", features,
                             "--attributes", table, "--attribute_columns", ",".join(COLUMNS), "--per_slot",
                             "--compare_weights", cls_checkpoint, "--nb_knn", "10", "20", "--output_dir", str(out),
                             *SMALL])
    return dict(root=root, data=data, checkpoint=checkpoint, cls=cls_checkpoint, rows=rows, table=table,
                features=features, out=out, results=results)


def independent_labels(setup, split):
    """Attribute values of ``split``'s images in folder order, straight from the CSV rows."""
    by_path = {row[0]: row[1:] for row in setup["rows"]}
    paths = images_under(os.path.join(setup["data"], split))
    return [by_path[os.path.relpath(path, setup["data"])] for path in paths]


def as_labels(values, classes):
    return torch.tensor([classes.index(value) for value in values])


def test_quantile_bins_follow_the_training_values_only():
    train = np.arange(100, dtype=float)
    names, train_bins, val_bins, edges = quantile_bins(train, np.array([-5.0, 24.75, 50.0, 1e6]), 4)
    assert edges == pytest.approx(np.quantile(train, [0.25, 0.5, 0.75]).tolist())
    assert np.bincount(train_bins).tolist() == [25, 25, 25, 25]
    assert val_bins.tolist() == [0, 0, 2, 3]  # a value on an edge goes to the lower bin
    assert names == ["<=24.75", "(24.75, 49.5]", "(49.5, 74.25]", ">74.25"]
    # A frequent value merges coinciding edges: fewer bins, none of them empty.
    names, train_bins, _, edges = quantile_bins(np.array([0.0] * 90 + list(range(1, 11))), np.array([0.0]), 4)
    assert edges == [0.0] and names == ["<=0", ">0"] and np.bincount(train_bins).tolist() == [90, 10]
    names, train_bins, _, edges = quantile_bins(np.array([5.0] * 80 + [1.0] * 20), np.array([1.0]), 4)
    assert edges == [1.0] and np.bincount(train_bins).tolist() == [20, 80]


def test_attribute_knn_matches_an_independent_knn(setup):
    features = setup["features"]
    train = torch.load(os.path.join(features, "trainfeat.pth"), weights_only=True)
    test = torch.load(os.path.join(features, "testfeat.pth"), weights_only=True)
    attributes = setup["results"]["attributes"]
    train_values, val_values = independent_labels(setup, "train"), independent_labels(setup, "val")
    # brightness is binned at the quartiles of the train images
    brightness = np.array([float(v[1]) for v in train_values])
    assert attributes["brightness"]["bin_edges"] == pytest.approx(np.quantile(brightness, [0.25, 0.5, 0.75]))
    assert attributes["parity"]["classes"] == ["0", "1"]  # two distinct numbers: kept as they are
    assert attributes["hue"]["classes"][:3] == ["hue0", "hue1", "hue2"]
    for column in ("hue", "parity", "noise"):
        index = COLUMNS.index(column)
        classes = attributes[column]["classes"]
        train_labels = as_labels([v[index] for v in train_values], classes)
        val_labels = as_labels([v[index] for v in val_values], classes)
        for k in (10, 20):
            expected = knn_classifier(train, train_labels, test, val_labels, k, 0.07, len(classes))
            got = attributes[column]["knn"][str(k)]
            assert (got["top1"], got["top5"]) == pytest.approx(expected)
        assert attributes[column]["chance"] == pytest.approx(100 * np.bincount(val_labels).max() / len(val_labels))
    assert json.loads((setup["out"] / "knn_attributes.json").read_text()) == attributes


def test_slot_matrix_matches_a_plain_knn_loop_on_the_dumped_features(setup):
    features = setup["features"]
    train = torch.load(os.path.join(features, "trainfeat.pth"), weights_only=True)
    test = torch.load(os.path.join(features, "testfeat.pth"), weights_only=True)
    written = json.loads((setup["out"] / "knn_slot_attributes.json").read_text())
    assert written == setup["results"]["slot_attributes"] and written["val_images"] == 37 and written["k"] == 20
    labels = {column: (as_labels([v[i] for v in independent_labels(setup, "train")],
                                 setup["results"]["attributes"][column]["classes"]) if column != "brightness" else None)
              for i, column in enumerate(COLUMNS)}
    val = {column: as_labels([v[i] for v in independent_labels(setup, "val")],
                             setup["results"]["attributes"][column]["classes"])
           for i, column in enumerate(COLUMNS) if column != "brightness"}
    by_slot = {row["slot"]: row["top1"] for row in written["slots"]}
    assert sorted(by_slot) == list(range(6))
    for column in ("hue", "parity", "noise"):
        count = len(setup["results"]["attributes"][column]["classes"])
        for slot in range(6):
            expected = knn_classifier(one_slot(train, slot), labels[column], one_slot(test, slot), val[column], 20,
                                      0.07, count)[0]
            assert by_slot[slot][column] == pytest.approx(expected)
        assert written["rows"]["all slots"][column] == pytest.approx(
            knn_classifier(train, labels[column], test, val[column], 20, 0.07, count)[0])
        column_values = [by_slot[slot][column] for slot in range(6)]
        assert written["specialisation"][column] == pytest.approx(max(column_values) - np.median(column_values))
    # the CLS row is that checkpoint's own attribute k-NN
    cls = eval_knn.main(["--pretrained_weights", setup["cls"], "--data_path", setup["data"], "--attributes",
                         setup["table"], "--attribute_columns", ",".join(COLUMNS), "--nb_knn", "20",
                         "--output_dir", str(setup["root"] / "cls_out"), *SMALL])
    assert written["rows"]["CLS"] == pytest.approx({c: cls["attributes"][c]["knn"]["20"]["top1"] for c in COLUMNS})
    # slots are grouped by their best attribute, in column order
    groups = [written["attributes"].index(row["best_attribute"]) for row in written["slots"]]
    assert groups == sorted(groups)
    image = Image.open(setup["out"] / "knn_slot_attributes.png")
    assert image.size[1] > 16 * (6 + 3) and image.size[0] >= 64 * len(COLUMNS)


def one_slot(features, slot):
    return restrict_to_slots(features, [slot], 16)


def test_rank_correlation_and_specialisation_against_hand_values():
    slots = {0: {"a": 10.0, "b": 30.0, "c": 50.0}, 1: {"a": 20.0, "b": 20.0, "c": 50.0},
             2: {"a": 30.0, "b": 10.0, "c": 50.0}, 3: {"a": 40.0, "b": 40.0, "c": 50.0}}
    matrix = SlotAttributeMatrix(["a", "b", "c"], {"a": 25.0, "b": 25.0, "c": 50.0}, slots, 20, 100)
    pairs = matrix.rank_correlations()
    assert pairs["a~b"] == pytest.approx(0.2)  # ranks 0,1,2,3 against 2,1,0,3: 1 - 6*8/(4*15)
    assert pairs["a~c"] is None and pairs["b~c"] is None  # c is the same in every slot
    assert matrix.mean_rank_correlation() == pytest.approx(0.2)
    assert matrix.specialisation() == pytest.approx({"a": 15.0, "b": 15.0, "c": 0.0})
    assert matrix.slot_order()[0] == 3 and matrix.best_attribute(0) == "b"


def test_selection_for_an_attribute_never_reads_val_labels(setup, tmp_path):
    """Permuting the val rows' attribute values changes the val accuracies but not the choice."""
    rows = setup["rows"]
    val_rows = [i for i, row in enumerate(rows) if row[0].startswith("val")]
    permuted = [list(row) for row in rows]
    order = np.random.default_rng(3).permutation(val_rows)
    for target, source in zip(val_rows, order):
        permuted[target][1:] = rows[source][1:]
    tables = {"original": setup["table"], "permuted": write_csv(tmp_path / "permuted.csv", permuted)}
    runs = {}
    for name, table in tables.items():
        runs[name] = eval_knn.main(["--pretrained_weights", setup["checkpoint"], "--data_path", setup["data"],
                                    "--load_features", setup["features"], "--attributes", table,
                                    "--attribute_columns", ",".join(COLUMNS), "--select_slots", "2",
                                    "--select_for", "hue", "--nb_knn", "10", "20",
                                    "--output_dir", str(tmp_path / name)])["selection_for"]
    assert runs["original"]["selected"] == runs["permuted"]["selected"] and len(runs["original"]["selected"]) == 2
    assert runs["original"]["holdout_scores"] == runs["permuted"]["holdout_scores"]
    assert runs["original"]["per_attribute"] != runs["permuted"]["per_attribute"]
    written = json.loads((tmp_path / "original" / "knn_slot_selection_for_hue.json").read_text())
    assert written == runs["original"] and set(written["per_attribute"]) == set(COLUMNS)
    # the reported val accuracy of the selection is a plain k-NN on those slots
    train = torch.load(os.path.join(setup["features"], "trainfeat.pth"), weights_only=True)
    test = torch.load(os.path.join(setup["features"], "testfeat.pth"), weights_only=True)
    classes = setup["results"]["attributes"]["hue"]["classes"]
    train_labels = as_labels([v[0] for v in independent_labels(setup, "train")], classes)
    val_labels = as_labels([v[0] for v in independent_labels(setup, "val")], classes)
    chosen = written["selected"]
    expected = knn_classifier(restrict_to_slots(train, chosen, 16), train_labels, restrict_to_slots(test, chosen, 16),
                              val_labels, 20, 0.07, len(classes))[0]
    assert written["per_attribute"]["hue"]["selected"]["20"] == pytest.approx(expected)


@pytest.mark.parametrize("case, edit, message", [
    ("no path column", lambda rows: ([r[1:] for r in rows], COLUMNS), "has no 'path' column"),
    ("unknown column", lambda rows: (rows, ["path", "hue", "brightness", "parity", "other"]),
     "--attribute_columns noise not in"),
    ("empty attribute", lambda rows: ([r if i != 5 else [*r[:2], "", *r[3:]] for i, r in enumerate(rows)],
                                      ["path", *COLUMNS]), "empty brightness for"),
    ("row for a missing image", lambda rows: (rows + [["train/class_00/gone.png", "hue0", "1", "0", "a"]],
                                              ["path", *COLUMNS]), "row(s) for images not found"),
    ("image without a row", lambda rows: (rows[1:], ["path", *COLUMNS]), "has no row for 1 image(s)"),
    ("repeated image", lambda rows: (rows + rows[:1], ["path", *COLUMNS]), "appears more than once"),
])
def test_csv_errors_are_one_line_and_come_before_the_model(setup, tmp_path, capsys, case, edit, message):
    rows, header = edit([list(row) for row in setup["rows"]])
    table = write_csv(tmp_path / "bad.csv", rows, header)
    # the checkpoint does not exist: the CSV must be rejected before anything is loaded or extracted
    err = run_error(["--pretrained_weights", str(tmp_path / "absent.pth"), "--data_path", setup["data"],
                     "--attributes", table, "--attribute_columns", ",".join(COLUMNS), "--output_dir",
                     str(tmp_path / "out"), *SMALL], capsys)
    assert message in err, err


def test_attribute_flag_errors(setup, tmp_path, capsys):
    base = ["--pretrained_weights", setup["checkpoint"], "--output_dir", str(tmp_path), *SMALL]
    with_csv = [*base, "--data_path", setup["data"], "--attributes", setup["table"]]
    assert "go together" in run_error([*with_csv], capsys)
    assert "empty name" in run_error([*with_csv, "--attribute_columns", "hue,,parity"], capsys)
    assert "more than once" in run_error([*with_csv, "--attribute_columns", "hue,hue"], capsys)
    assert "needs --data_path" in run_error([*base, "--load_features", setup["features"], "--attributes",
                                             setup["table"], "--attribute_columns", "hue"], capsys)
    assert "needs --select_slots K" in run_error([*with_csv, "--attribute_columns", "hue", "--select_for", "hue"],
                                                 capsys)
    assert "not one of --attribute_columns" in one_line_error(eval_knn.main,
        [*with_csv, "--attribute_columns", "hue", "--select_slots", "2", "--select_for", "parity"], capsys)
    assert "needs --per_slot" in run_error([*with_csv, "--attribute_columns", "hue", "--compare_weights",
                                            setup["cls"]], capsys)
    assert "at least 2" in run_error([*with_csv, "--attribute_columns", "hue", "--attribute_bins", "1"], capsys)
    assert "not found" in run_error([*base, "--data_path", setup["data"], "--attributes", str(tmp_path / "x.csv"),
                                     "--attribute_columns", "hue"], capsys)
    assert "--select_slots needs an encoding made of slots" in one_line_error(eval_knn.main,
        ["--pretrained_weights", setup["cls"], "--output_dir", str(tmp_path), *SMALL, "--data_path", setup["data"],
         "--attributes", setup["table"], "--attribute_columns", "hue", "--select_slots", "1", "--select_for", "hue"],
        capsys)

