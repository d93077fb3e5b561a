
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
from dino_sparo.eval.probe_heads import LinearClassifier
from dino_sparo.eval.probe_inputs import ProbeFeatures
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
    calls = {"n": 0}
    real_validate = linear.validate

    def validate_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(linear, "validate", validate_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: eval_linear.main([*argv, "--output_dir", str(tmp_path / "resumed")]))
    assert exit_info.value.code == 130
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(linear, "validate", real_validate)
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
