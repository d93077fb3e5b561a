
"""eval_linear.py: probe features, training above chance, resuming, evaluating, checkpoint formats."""
import json
import math
import os
from functools import partial

import pytest
import torch
from helpers import balanced, make_image_folder, one_line_error, spread, write_main_dino_checkpoint

import eval_linear
from dino_sparo.errors import run_cli
from dino_sparo.eval import linear
from dino_sparo.eval.probes import train as probe_train
from dino_sparo.eval.probes.heads import LinearClassifier
from dino_sparo.eval.probes.inputs import ProbeFeatures
from dino_sparo.eval.probes.recipes import DINOV2_LEARNING_RATES as DINOV2_GRID
from dino_sparo.models import vit_tiny

run_error = partial(one_line_error, eval_linear.main)  # its one-line error, after checking status 2

SMALL = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "16",
         "--lr", "1.0", "--epochs", "2"]


@pytest.fixture(scope="module")
def data_and_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    data = make_image_folder(str(root / "data"), {"train": balanced(10, 10), "val": spread(10, 30)}, contrast=30)
    checkpoint = str(root / "checkpoint.pth")
    write_main_dino_checkpoint(checkpoint)
    return data, checkpoint


def interrupt_at_call(monkeypatch, module, name: str, call: int, argv: list, output_dir) -> None:
    """Runs eval_linear.py as its script does with ``module.name`` raising KeyboardInterrupt (Ctrl-C) at its
    ``call``-th call: exit status 130 and the checkpoint of epoch 1 on disk; ``module.name`` is then restored."""
    real = getattr(module, name)
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: eval_linear.main([*argv, "--output_dir", str(output_dir)]))
    assert exit_info.value.code == 130
    assert torch.load(output_dir / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(module, name, real)

def test_linear_classifier_initialisation():
    classifier = LinearClassifier(2000, 50)
    assert torch.all(classifier.linear.bias == 0)
    assert classifier.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_probe_features_per_read_out():
    images = torch.randn(2, 3, 32, 32)
    cls_model = vit_tiny(patch_size=8, depth=4, readout="cls").eval()
    tokens = cls_model.get_intermediate_layers(images, 3)
    probe = ProbeFeatures(cls_model, n_last_blocks=3, avgpool_patchtokens=True)
    expected = torch.cat([t[:, 0] for t in tokens] + [tokens[-1][:, 1:].mean(dim=1)], dim=1)
    assert probe.feature_dim == 4 * 192
    torch.testing.assert_close(probe(images), expected)
    # One block + patch mean (DINO's ViT-B setting): laid out as DINO's eval_linear does, CLS and mean
    # interleaved, cat((cls.unsqueeze(-1), avg.unsqueeze(-1)), -1).reshape(B, -1), so its weights apply.
    last = tokens[-1]
    reference = torch.cat((last[:, 0].unsqueeze(-1), last[:, 1:].mean(dim=1).unsqueeze(-1)), dim=-1).reshape(2, -1)
    one_block = ProbeFeatures(cls_model, n_last_blocks=1, avgpool_patchtokens=True)
    assert one_block.feature_dim == 2 * 192
    torch.testing.assert_close(one_block(images), reference)

    sparo_model = vit_tiny(patch_size=8, depth=4, readout="sparo", sparo_slots=4, sparo_slot_dim=8).eval()
    encoding = sparo_model(images)
    alone = ProbeFeatures(sparo_model, n_last_blocks=0, avgpool_patchtokens=False)(images)
    assert alone.shape == (2, 32)
    torch.testing.assert_close(alone, encoding / encoding.norm(dim=1, keepdim=True) * math.sqrt(32))
    with_cls = ProbeFeatures(sparo_model, n_last_blocks=2, avgpool_patchtokens=False)
    tokens = sparo_model.get_intermediate_layers(images, 2)  # of the 3 blocks SPARO left
    assert with_cls.feature_dim == 32 + 2 * 192
    torch.testing.assert_close(with_cls(images), torch.cat([alone, tokens[0][:, 0], tokens[1][:, 0]], dim=1))
    chosen = ProbeFeatures(sparo_model, 0, False, slots=[3, 1])(images)
    picked = torch.cat([encoding[:, 24:32], encoding[:, 8:16]], dim=1)
    torch.testing.assert_close(chosen, picked / picked.norm(dim=1, keepdim=True) * 4.0)


def read_log(directory):
    with open(os.path.join(directory, "log.txt")) as handle:
        return [json.loads(line) for line in handle]


def test_trains_above_chance_then_resumes_and_evaluates(data_and_checkpoint, tmp_path, monkeypatch, capsys):
    data, checkpoint = data_and_checkpoint
    argv = ["--pretrained_weights", checkpoint, "--data_path", data, *SMALL]
    straight = eval_linear.main([*argv, "--output_dir", str(tmp_path / "straight")])
    assert straight["best_acc"] > 30  # chance is 10%
    assert "SPARO read-out" in straight["features"]
    log = read_log(tmp_path / "straight")
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["best_acc"] == straight["best_acc"]
    assert log[1]["train_lr"] == pytest.approx(log[0]["train_lr"] / 2)  # cosine over 2 epochs
    assert log[0]["train_lr"] == pytest.approx(1.0 * 16 / 256)
    saved = torch.load(tmp_path / "straight" / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 2 and saved["best_acc"] == straight["best_acc"]
    assert set(saved) >= {"epoch", "state_dict", "optimizer", "scheduler", "best_acc"}

    # Interrupted during the second epoch's validation: the checkpoint of epoch 1 stays intact.
    interrupt_at_call(monkeypatch, linear, "validate", 2, argv, tmp_path / "resumed")
    resumed = eval_linear.main([*argv, "--output_dir", str(tmp_path / "resumed")])
    assert resumed["start_epoch"] == 1 and [r["epoch"] for r in read_log(tmp_path / "resumed")] == [0, 1]
    final = torch.load(tmp_path / "resumed" / "checkpoint.pth.tar", weights_only=True)
    for key, value in saved["state_dict"].items():  # same run as the uninterrupted one
        torch.testing.assert_close(final["state_dict"][key], value)
    assert resumed["best_acc"] == pytest.approx(straight["best_acc"])

    capsys.readouterr()
    evaluated = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", data, *SMALL, "--evaluate",
                                  "--linear_weights", str(tmp_path / "straight" / "checkpoint.pth.tar")])
    assert evaluated["val"]["acc1"] == pytest.approx(log[1]["test_acc1"])
    assert "Accuracy of the network on the 30 test images" in capsys.readouterr().out


def test_cls_checkpoint_in_dino_format_and_errors(data_and_checkpoint, tmp_path, capsys):
    data, checkpoint = data_and_checkpoint
    model = vit_tiny(patch_size=8, depth=3, readout="cls")
    official = tmp_path / "dino_official.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, official)  # a bare backbone
    results = eval_linear.main(["--pretrained_weights", str(official), "--data_path", data, *SMALL, "--epochs", "1",
                                "--output_dir", str(tmp_path / "cls")])
    assert results["features"] == "CLS tokens of the last 3 block(s) (576 dims)"  # DINO's 4, capped at depth
    main_dino_cls = tmp_path / "main_dino_cls.pth"
    write_main_dino_checkpoint(str(main_dino_cls), readout="cls")
    results = eval_linear.main(["--pretrained_weights", str(main_dino_cls), "--data_path", data, *SMALL,
                                "--epochs", "1", "--n_last_blocks", "1", "--avgpool_patchtokens", "true",
                                "--output_dir", str(tmp_path / "cls2")])
    assert results["features"] == "CLS tokens of the last 1 block(s) + mean of the last block's patch tokens (384 dims)"

    assert "--evaluate needs --linear_weights" in one_line_error(eval_linear.main,
        ["--pretrained_weights", checkpoint, "--data_path", data, "--evaluate"], capsys)
    assert "--n_last_blocks must be between 0 and the 2 remaining blocks" in one_line_error(eval_linear.main,
        ["--pretrained_weights", checkpoint, "--data_path", data, *SMALL, "--n_last_blocks", "3"], capsys)
    assert "--slots 9 out of range" in one_line_error(eval_linear.main,
        ["--pretrained_weights", checkpoint, "--data_path", data, *SMALL, "--slots", "1,9"], capsys)
    # Resuming with other features or another schedule would silently mix two runs.
    assert "was trained on" in run_error(["--pretrained_weights", str(official), "--data_path", data, *SMALL,
                                          "--epochs", "1", "--n_last_blocks", "2", "--output_dir",
                                          str(tmp_path / "cls")], capsys)
    assert "resume it with --epochs 1" in run_error(["--pretrained_weights", str(official), "--data_path", data,
                                                     *SMALL, "--epochs", "5", "--output_dir", str(tmp_path / "cls")],
                                                    capsys)


# --- the probe grid (no --lr): learning rates x feature sets at once, chosen on held-out training images ---

GRID = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "16"]


def test_linear_grid_chooses_on_held_out_images_and_reports_every_point(data_and_checkpoint, tmp_path, capsys):
    data, checkpoint = data_and_checkpoint
    out = tmp_path / "grid"
    results = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", data, *GRID, "--epochs", "2",
                                "--feature_sets", "0", "1+avgpool", "--output_dir", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    rows = results["grid"]
    assert [(row["inputs"], row["lr"]) for row in rows] == [(i, lr) for i in (0, 1) for lr in DINOV2_GRID]
    assert results["inputs"] == ["SPARO read-out (96 dims)",
                                 "SPARO read-out + CLS tokens of the last 1 block(s) + mean of the last block's patch "
                                 "tokens (480 dims)"]
    for row in rows:
        assert row["scaled_lr"] == pytest.approx(row["lr"] * 16 / 256)
    # The choice: the best held-out top-1 (ties: lowest held-out loss), whatever val says.
    best = min(range(len(rows)), key=lambda i: (-rows[i]["holdout_acc1"], rows[i]["holdout_loss"], i))
    assert results["chosen"]["index"] == best and results["val"]["acc1"] == rows[best]["val_acc1"]
    assert results["holdout"]["images"] == 10 and results["holdout"]["val_split"] == 0.1  # of 100 train images
    assert results["val"]["images"] == 30 and results["holdout"]["seed"] == 0
    assert "val labels are not used to choose (DINOv2 chooses on val)" in printed
    assert results["val"]["acc1"] > 30  # chance is 10%
    at_edge = rows[best]["lr"] in (min(DINOV2_GRID), max(DINOV2_GRID))
    assert results["chosen"]["at_grid_edge"] == at_edge
    assert ("a better one may lie beyond it" in captured.out + captured.err) == at_edge
    saved = json.loads((out / "probe_results.json").read_text())
    assert saved["grid"] == rows and saved["chosen"]["index"] == best
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["best_acc"] == results["val"]["acc1"]
    assert len(log[0]["grid"]) == 30 and log[-1]["chosen_lr"] == rows[best]["lr"]

    capsys.readouterr()
    evaluated = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", data, *GRID,
                                  "--feature_sets", "0", "1+avgpool", "--evaluate", "--linear_weights",
                                  str(out / "checkpoint.pth.tar")])
    assert [row["val_acc1"] for row in evaluated["grid"]] == pytest.approx([row["val_acc1"] for row in rows])
    assert evaluated["chosen"] == best and evaluated["val"]["acc1"] == pytest.approx(results["val"]["acc1"])
    assert "Accuracy of the classifier chosen on held-out images" in capsys.readouterr().out
    slots = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", data, *GRID, "--epochs", "1",
                              "--slots", "1,3", "--learning_rates", "1e-7", "0.5", "--output_dir",
                              str(tmp_path / "slots")])
    assert slots["inputs"] == ["SPARO read-out slots 1,3 (32 dims)"] and len(slots["grid"]) == 2
    # A head that cannot move (lr 1e-7) loses: the choice sits at the grid's edge, and the output says so.
    assert slots["chosen"]["lr"] == 0.5 and slots["chosen"]["at_grid_edge"]
    assert "the chosen learning rate 0.5 is the grid's largest" in "".join(capsys.readouterr())


def test_a_one_point_grid_trains_as_the_reference_classifier(data_and_checkpoint, tmp_path):
    """Same initialisation, batches, augmentations and schedule: the grid's head equals DINO's single classifier."""
    data, checkpoint = data_and_checkpoint
    argv = ["--pretrained_weights", checkpoint, "--data_path", data, *GRID, "--epochs", "2"]
    eval_linear.main([*argv, "--lr", "1.0", "--output_dir", str(tmp_path / "reference")])
    eval_linear.main([*argv, "--learning_rates", "1.0", "--val_split", "0", "--output_dir", str(tmp_path / "grid")])
    reference = torch.load(tmp_path / "reference" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    grid = torch.load(tmp_path / "grid" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert set(grid) == {"heads.0.linear.weight", "heads.0.linear.bias"}
    for name in ("linear.weight", "linear.bias"):
        torch.testing.assert_close(grid[f"heads.0.{name}"], reference[name])


@pytest.mark.parametrize("probe_flags", [
    ["--probe", "attentive", "--probe_queries", "4", "--train_augmentation", "false"],  # LARS, BatchNorm, cache
    ["--probe", "cross_attention", "--learning_rates", "0.05", "0.5"],  # SGD, augmented images each epoch
], ids=["attentive_cached", "cross_attention_augmented"])
def test_attentive_probes_resume_exactly(data_and_checkpoint, tmp_path, monkeypatch, capsys, probe_flags):
    data, checkpoint = data_and_checkpoint
    argv = ["--pretrained_weights", checkpoint, "--data_path", data, *GRID, "--epochs", "3", *probe_flags]
    straight = eval_linear.main([*argv, "--output_dir", str(tmp_path / "straight")])
    # the 3rd call is epoch 2's first validation: the checkpoint of epoch 1 is on disk
    interrupt_at_call(monkeypatch, probe_train, "score", 3, argv, tmp_path / "resumed")
    capsys.readouterr()
    resumed = eval_linear.main([*argv, "--output_dir", str(tmp_path / "resumed")])
    cached = "--train_augmentation" in probe_flags
    assert ("probe inputs read from" in capsys.readouterr().out) == cached  # not extracted again
    assert resumed["start_epoch"] == 1 and [r["epoch"] for r in read_log(tmp_path / "resumed")] == [0, 1, 2]
    final = torch.load(tmp_path / "resumed" / "checkpoint.pth.tar", weights_only=True)
    expected = torch.load(tmp_path / "straight" / "checkpoint.pth.tar", weights_only=True)
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, msg=key)
    assert resumed["grid"] == straight["grid"] and resumed["chosen"] == straight["chosen"]
    if cached:  # the cache holds the probe's input: the backbone's tokens of each image's evaluation view
        from dino_sparo.data.datasets import ImageDataset
        from dino_sparo.data.transforms import eval_transform
        from dino_sparo.models import build_pretrained_backbone

        cache = torch.load(tmp_path / "straight" / "feature_cache" / "val.pth", weights_only=True)
        backbone, _ = build_pretrained_backbone(checkpoint, "teacher", {}, verbose=False)
        images = torch.stack([image for image, _ in ImageDataset(os.path.join(data, "val"), eval_transform(32, 32))])
        with torch.no_grad():
            torch.testing.assert_close(cache["features"][0], backbone.tokens(images), atol=1e-5, rtol=1e-4)
        assert cache["labels"].tolist() == [label for _, label in ImageDataset(os.path.join(data, "val")).samples]


def test_grid_bad_inputs_are_one_line_errors(data_and_checkpoint, tmp_path, capsys):
    data, checkpoint = data_and_checkpoint
    base = ["--pretrained_weights", checkpoint, "--data_path", data, *GRID, "--epochs", "1",
            "--output_dir", str(tmp_path / "out")]
    features = tmp_path / "trainfeat.pth"
    torch.save(torch.randn(4, 96), features)
    cases = [
        (["--learning_rates"], "--learning_rates is empty"),
        (["--learning_rates", "0.1", "-1", "0"], "learning rates must be positive, got -1, 0"),
        (["--lr", "0"], "learning rates must be positive, got 0"),
        (["--lr", "1", "--learning_rates", "1"], "give --lr (one learning rate) or --learning_rates"),
        (["--lr", "1", "--val_split", "0.2"], "--lr runs DINO's single linear classifier exactly; --val_split"),
        (["--val_split", "100"], "--val_split 100 holds out 100 of the 100 training images"),
        (["--val_split", "0"], "--val_split 0 leaves nothing to choose the 15 classifiers"),
        (["--probe", "attentive", "--probe_queries", "0"], "--probe_queries (Q) must be >= 1, got 0"),
        (["--probe", "attentive", "--probe_queries", "5"], "--probe_queries 5 does not divide the token width 192"),
        (["--probe", "attentive", "--probe_registers"], "this model has no register tokens"),
        (["--probe", "attentive", "--slots", "1"], "--probe attentive reads the backbone's tokens; --slots"),
        (["--probe", "cross_attention", "--n_last_blocks", "1"], "reads the backbone's tokens; --n_last_blocks"),
        (["--probe_queries", "4"], "--probe_queries set the attentive probes"),
        (["--feature_sets", "1", "--n_last_blocks", "1"], "--feature_sets replaces --n_last_blocks"),
        (["--feature_sets", "3"], "--n_last_blocks must be between 0 and the 2 remaining blocks, got 3"),
        (["--recipe", "efficient_probing", "--warmup_epochs", "1"], "--warmup_epochs 1 must be below --epochs 1"),
    ]
    for argv, message in cases:
        assert message in run_error([*base, *argv], capsys), argv
    # An attentive probe needs a model's tokens: frozen features (eval_knn.py --dump_features) have none.
    assert "does not hold a dictionary of weights" in run_error(
        ["--pretrained_weights", str(features), *base[2:], "--probe", "attentive"], capsys)
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pth.tar")

    eval_linear.main([*base, "--learning_rates", "0.1", "1"])
    reference = tmp_path / "reference.pth.tar"
    torch.save({"state_dict": {"linear.weight": torch.zeros(10, 96), "linear.bias": torch.zeros(10)}}, reference)
    written = (tmp_path / "out" / "checkpoint.pth.tar").read_bytes()
    assert "was written with other settings: learning_rates [0.1, 1.0] (now [0.1])" in run_error(
        [*base, "--learning_rates", "0.1"], capsys)
    assert "was written by a probe grid" in run_error([*base, "--lr", "0.1"], capsys)
    assert "holds another grid: probe 'linear' (now 'attentive')" in run_error(
        [*base, "--probe", "attentive", "--probe_queries", "4", "--evaluate", "--linear_weights",
         str(tmp_path / "out" / "checkpoint.pth.tar")], capsys)
    assert "holds a single linear classifier, not a --probe attentive grid" in run_error(
        [*base, "--probe", "attentive", "--evaluate", "--linear_weights", str(reference)], capsys)
    assert (tmp_path / "out" / "checkpoint.pth.tar").read_bytes() == written  # nothing already written lost


def _probe_results(rank: int, world_size: int, argv: list[str]) -> dict:
    """One of two gloo processes: eval_linear.main, as torchrun would run it."""
    torch.set_num_threads(1)
    results = eval_linear.main(argv)
    return {key: results[key] for key in ("grid", "chosen", "val")}


@pytest.mark.slow
def test_attentive_probes_under_two_gloo_processes(data_and_checkpoint, tmp_path, gloo_pair):
    """Two processes of 8 images per batch train the grid one process of 16 does (the same batches, gradients
    averaged by DDP, inputs extracted and cached by shards); Efficient Probing, whose BatchNorm sees each process's
    batch, runs and both processes report the same choice."""
    data, checkpoint = data_and_checkpoint
    base = ["--pretrained_weights", checkpoint, "--data_path", data, *GRID[:-2], "--epochs", "2"]
    cross = ["--probe", "cross_attention", "--train_augmentation", "false", "--learning_rates", "0.05", "0.5"]
    attentive = ["--probe", "attentive", "--probe_queries", "4"]
    runs = {"cross": [*base, *cross, "--batch_size_per_gpu", "8", "--output_dir", str(tmp_path / "c2")],
            "attentive": [*base, *attentive, "--batch_size_per_gpu", "8", "--output_dir", str(tmp_path / "a2")]}
    reported = {}
    for name, argv in runs.items():
        for rank, results in enumerate(gloo_pair.run(_probe_results, argv, timeout=240)):
            reported[rank, name] = results
    for name in ("cross", "attentive"):
        assert reported[0, name] == reported[1, name]
    single = eval_linear.main([*base, *cross, "--batch_size_per_gpu", "16", "--output_dir", str(tmp_path / "c1")])
    assert [row["val_acc1"] for row in reported[0, "cross"]["grid"]] == pytest.approx(
        [row["val_acc1"] for row in single["grid"]])
    two = torch.load(tmp_path / "c2" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    one = torch.load(tmp_path / "c1" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert (tmp_path / "c2" / "feature_cache" / "train.pth").is_file()
    attentive_log = read_log(tmp_path / "a2")
    assert [r["epoch"] for r in attentive_log] == [0, 1] and len(attentive_log[-1]["grid"]) == 7
