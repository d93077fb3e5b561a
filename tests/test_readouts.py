"""Every registered read-out, through everything that uses one: the model's forward and backward, a checkpoint
round trip, architecture inference from the weights alone, training, eval_knn.py, eval_linear.py and (where the
read-out has attention maps) visualize_sparo.py and the slot statistics. A new read-out is covered by adding it
to the registry."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, backbone_of, balanced, make_image_folder, make_images, tiny_config

import eval_knn
import eval_linear
import visualize_sparo
from benchmarks.reference_readouts import reference_forward
from dino_sparo.checkpoint import read_checkpoint
from dino_sparo.data.datasets import ImageDataset
from dino_sparo.data.transforms import eval_transform
from dino_sparo.models import (
    READOUTS,
    DINOHead,
    ModelConfig,
    MultiCropWrapper,
    build_backbone,
    build_pretrained_backbone,
)
from dino_sparo.optim import get_params_groups
from dino_sparo.train import train_dino
from dino_sparo.train.state import TrainState

NAMES = list(READOUTS)
TINY = dict(arch="vit_tiny", patch_size=8, depth=3, sparo_slots=4, sparo_slot_dim=8)
EVAL_SIZES = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "16"]


def tiny_model(name: str, **overrides):
    torch.manual_seed(0)
    return backbone_of(**TINY, readout=name, **overrides)


def save_checkpoint(path, name: str, **overrides) -> torch.nn.Module:
    """A checkpoint as main_dino.py writes it (through the one writer), for a tiny model with read-out ``name``."""
    config = ModelConfig.resolve(dict(TINY, readout=name, **overrides))
    backbone = build_backbone(config)
    teacher = MultiCropWrapper(backbone, DINOHead(backbone.feature_dim, 64, hidden_dim=32, bottleneck_dim=16))
    optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1)
    args = dict(config.flags(), out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, use_bn_in_head=False)
    TrainState(teacher, teacher, optimizer, torch.nn.Module(), None, args).save(path, epoch=1)
    return backbone.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("readouts") / "data"),
                             {"train": balanced(4, 6), "val": balanced(4, 3)}, contrast=60)


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_shapes(name):
    model = tiny_model(name)
    readout = model.readout_module
    assert model.readout == name and readout.name == name and type(readout) is READOUTS[name]
    assert getattr(model, readout.state_prefix) is readout
    assert len(model.blocks) == TINY["depth"] - READOUTS[name].replaced_blocks
    assert model.feature_dim == readout.output_dim
    for size in ((32, 32), (16, 24)):
        features = model(torch.randn(2, 3, *size))
        assert features.shape == (2, model.feature_dim)
        features.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    if readout.has_attention_maps:
        maps = model.get_slot_attention(torch.randn(2, 3, 32, 32))
        assert maps.shape == (2, readout.num_maps, 1 + 16)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, readout.num_maps))
    else:
        with pytest.raises(ValueError, match="attention maps"):
            model.get_slot_attention(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", NAMES)
def test_reference_forward_equals_forward(name):
    model = tiny_model(name).double().eval()
    tokens = torch.randn(3, 17, 192, dtype=torch.float64)
    torch.testing.assert_close(reference_forward(model.readout_module, tokens), model.readout_module(tokens))


@pytest.mark.parametrize("name", NAMES)
def test_replaced_blocks_can_be_set_for_every_read_out(name):
    on_top = tiny_model(name, readout_replace_blocks=0)
    two_replaced = tiny_model(name, readout_replace_blocks=2)
    assert len(on_top.blocks) == 3 and len(two_replaced.blocks) == 1
    assert on_top(torch.randn(1, 3, 32, 32)).shape == (1, on_top.feature_dim)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    model = save_checkpoint(tmp_path / "checkpoint.pth", name)
    loaded, config = build_pretrained_backbone(str(tmp_path / "checkpoint.pth"), "teacher", {}, verbose=False)
    assert config.readout == name and type(loaded.readout_module) is READOUTS[name]
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), model(images))
    assert read_checkpoint(tmp_path / "checkpoint.pth")["args"]["readout_replace_blocks"] == \
        READOUTS[name].replaced_blocks


@pytest.mark.parametrize("name", NAMES)
def test_architecture_inferred_from_the_weights_alone(name, tmp_path):
    """A bare backbone state dict (no saved args, as DINO's official files): the read-out is recognised from its
    tensors; read-outs without tensors cannot be told apart and are evaluated as DINO's CLS read-out."""
    model = tiny_model(name, readout_replace_blocks=1).eval()
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    loaded, config = build_pretrained_backbone(str(tmp_path / "bare.pth"), "teacher", {}, verbose=False)
    has_tensors = any(True for _ in model.readout_module.parameters())
    expected = name if has_tensors else "cls"
    assert (config.arch, config.patch_size, config.readout) == ("vit_tiny", 8, expected)
    assert len(loaded.blocks) == len(model.blocks)
    if has_tensors:  # the read-out's own options were inferred too, or the strict load would have failed
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded(images), model(images))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups_cover_every_trainable_parameter_once(name):
    model = tiny_model(name)
    groups = get_params_groups(model, ModelConfig.resolve(dict(TINY, readout=name)).readout_options)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert groups[0]["regularized"] and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_training_logs_the_read_out_and_its_maps(name, tmp_path):
    images = make_images(tmp_path / "images", count=8, size=32)
    result = train_dino(tiny_config(images, tmp_path / "out", "--readout", name, "--epochs", "1", "--precision",
                                  "fp32", "--patch_size", "8"))
    with open(tmp_path / "out" / "log.txt") as handle:
        record = json.loads(handle.readline())
    assert result.student.backbone.readout == name
    assert ("slot_peakedness" in record) == result.student.backbone.readout_module.has_attention_maps
    assert record["precision"] == "fp32" and record["device"] == "cpu" and 0 <= record["data_wait_share"] <= 1


@pytest.mark.parametrize("name", NAMES)
def test_eval_knn_uses_the_read_outs_encoding(name, data, tmp_path):
    model = save_checkpoint(tmp_path / "checkpoint.pth", name)
    results = eval_knn.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--data_path", data,
                             "--nb_knn", "5", "--dump_features", str(tmp_path / "features"), *EVAL_SIZES])
    assert set(results["knn"]) == {"5"}
    dumped = torch.load(tmp_path / "features" / "testfeat.pth", weights_only=True)
    val = ImageDataset(os.path.join(data, "val"), eval_transform(32, 32))
    first = torch.stack([val[index][0] for index in range(2)])
    torch.testing.assert_close(dumped[:2], F.normalize(model(first), dim=1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_eval_linear_trains_on_the_read_outs_probe_features(name, data, tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pth", name)
    results = eval_linear.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--data_path", data,
                                "--epochs", "1", "--output_dir", str(tmp_path / "linear"), *EVAL_SIZES])
    grid = results["grid"]
    assert len(results["history"]) == 1 and len({point["lr"] for point in grid}) == len(grid) > 1
    # the chosen classifier is the grid point best on held-out training images (ties: the lower held-out loss)
    best = max(grid, key=lambda point: (point["holdout_acc1"], -point["holdout_loss"]))
    assert results["chosen"]["lr"] == best["lr"] and results["val"]["acc1"] == best["val_acc1"]
    assert READOUTS[name].name.upper() in results["inputs"][0] or "CLS tokens" in results["inputs"][0]


@pytest.mark.parametrize("name", NAMES)
def test_visualisation_draws_maps_where_the_read_out_has_them(name, data, tmp_path):
    model = save_checkpoint(tmp_path / "checkpoint.pth", name)
    summary = visualize_sparo.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--images",
                                    os.path.join(data, "val"), "--max_images", "2", "--image_size", "32",
                                    "--output_dir", str(tmp_path / "viz"), "--device", "cpu"])
    drawn = set(os.listdir(tmp_path / "viz"))
    assert {"heads.png", "summary.json"} <= drawn
    assert ("slots.png" in drawn) == model.readout_module.has_attention_maps
    if model.readout_module.has_attention_maps:  # the summary's peakedness, computed here by hand
        from dino_sparo.viz.images import find_images, prepare_images

        prefix = model.readout_module.num_prefix_tokens
        expected = []
        for image in prepare_images(find_images([os.path.join(data, "val")], 2), [32], 8):
            with torch.no_grad():
                patches = model.get_slot_attention(image.tensor[None])[0, :, prefix:].double()
            p = patches / patches.sum(dim=-1, keepdim=True)
            expected.append(1 + (p * p.log()).sum(dim=-1) / math.log(p.shape[-1]))
        assert summary["slot_statistics"]["slot_peakedness"] == pytest.approx(float(torch.cat(expected).mean()),
                                                                             abs=1e-5)


def test_a_checkpoint_of_commit_9668c67_evaluates_and_resumes(data, tmp_path):
    """Checkpoints written before the config was resolved once: their saved args hold flags since removed
    (--sparo_logit_scale, --sparo_weight_decay, --use_fp16), None for derived defaults, and optimizer groups without
    a "regularized" mark on the undecayed one (tests/fixtures/checkpoint_9668c67.json, read off such a run)."""
    with open(os.path.join(ROOT, "tests", "fixtures", "checkpoint_9668c67.json")) as handle:
        old = json.load(handle)
    images = make_images(tmp_path / "images", count=8, size=32)
    out = tmp_path / "out"
    flags = ["--patch_size", "8", "--sparo_slots", "4", "--sparo_slot_dim", "8", "--precision", "fp32"]
    train_dino(tiny_config(images, out, "--epochs", "1", *flags))
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(checkpoint) == set(old["keys"])
    groups = [{**settings, "params": group["params"]}
              for settings, group in zip(old["optimizer_param_groups"], checkpoint["optimizer"]["param_groups"])]
    args = {**old["args"], "data_path": str(images), "output_dir": str(out)}
    assert args["sparo_attn_dim"] is None and "regularized" not in groups[1]
    torch.save({**checkpoint, "args": args, "optimizer": {**checkpoint["optimizer"], "param_groups": groups}},
               out / "checkpoint.pth")

    model, config = build_pretrained_backbone(str(out / "checkpoint.pth"), "teacher", {}, verbose=False)
    assert (config.readout, config.readout_options["sparo_slots"], len(model.blocks)) == ("sparo", 4, 2)
    results = eval_knn.main(["--pretrained_weights", str(out / "checkpoint.pth"), "--data_path", data,
                             "--nb_knn", "5", *EVAL_SIZES])
    assert set(results["knn"]) == {"5"}
    linear = eval_linear.main(["--pretrained_weights", str(out / "checkpoint.pth"), "--data_path", data,
                               "--lr", "0.001", "--epochs", "1", "--output_dir", str(tmp_path / "linear"), *EVAL_SIZES])
    assert linear["features"] == "SPARO read-out (32 dims)" and len(linear["history"]) == 1
    summary = visualize_sparo.main(["--pretrained_weights", str(out / "checkpoint.pth"), "--images",
                                    os.path.join(data, "val"), "--max_images", "2", "--image_size", "32",
                                    "--output_dir", str(tmp_path / "viz"), "--device", "cpu"])
    assert len(summary["slots"]) == 4 and (tmp_path / "viz" / "slots.png").exists()
    resumed = train_dino(tiny_config(images, out, "--epochs", "2", *flags))
    assert resumed.start_epoch == 1 and [stats["epoch"] for stats in resumed.epoch_stats] == [1]
    decayed, undecayed = torch.load(out / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"]
    assert decayed["weight_decay"] > 0 and undecayed["weight_decay"] == 0  # the old groups keep their roles


@pytest.mark.parametrize("name", NAMES)
def test_registers_follow_the_cls_token_and_the_read_out_ignores_them_by_default(name):
    model = tiny_model(name, num_registers=4).eval()
    images = torch.randn(2, 3, 32, 32)
    assert model.num_prefix_tokens == 5 and model.prepare_tokens(images).shape[1] == 1 + 4 + 16
    assert model.readout_module.num_prefix_tokens == 1
    tokens = model.tokens(images)
    torch.testing.assert_close(model(images), model.readout_module(torch.cat([tokens[:, :1], tokens[:, 5:]], 1)))
    seeing = tiny_model(name, num_registers=4, readout_sees_registers=True).eval()
    assert seeing.readout_module.num_prefix_tokens == 5
    torch.testing.assert_close(seeing(images), seeing.readout_module(seeing.tokens(images)))
    if model.readout_module.has_attention_maps:
        assert model.get_slot_attention(images).shape[-1] == 1 + 16
        assert seeing.get_slot_attention(images).shape[-1] == 1 + 4 + 16


def test_weights_without_registers_load_into_a_register_model_and_registers_are_inferred(tmp_path, capsys):
    from dino_sparo.checkpoint import load_pretrained_weights

    plain = tiny_model("cls").eval()
    torch.save(plain.state_dict(), tmp_path / "dino.pth")
    with_registers = tiny_model("sparo", num_registers=2, readout_replace_blocks=0)
    report = load_pretrained_weights(with_registers, str(tmp_path / "dino.pth"))
    assert "reg_token" in report.missing and "reg_token" in capsys.readouterr().out
    torch.testing.assert_close(with_registers.pos_embed, plain.pos_embed)  # registers have no position embedding
    torch.save(with_registers.state_dict(), tmp_path / "registers.pth")
    loaded, config = build_pretrained_backbone(str(tmp_path / "registers.pth"), "teacher", {}, verbose=False)
    assert config.num_registers == 2 and config.readout == "sparo"
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(images), with_registers.eval()(images))


def test_a_retrofit_freezes_the_registers_with_the_embeddings():
    model = tiny_model("sparo", num_registers=2)
    model.freeze_blocks(2)
    assert not model.reg_token.requires_grad and not model.cls_token.requires_grad


def test_the_artefact_diagnostic_sees_a_planted_high_norm_token():
    """Token 7 of the last block's output is scaled up tenfold: its norm is far above the median patch token's,
    so each map's high-norm share is exactly its attention on token 7, and the CLS share the CLS attention there."""
    from dino_sparo.eval.slot_stats import measure_slots

    model = tiny_model("sparo").eval()
    planted = 7

    def plant(module, inputs, output):
        output = output.clone()
        output[:, planted] *= 10
        return output

    model.blocks[-1].register_forward_hook(plant)
    images = torch.randn(3, 3, 32, 32)
    stats = measure_slots(model, [images], "cpu")
    with torch.no_grad():
        found = model.inspect(images)
    torch.testing.assert_close(stats.high_norm_share, found.readout_maps[:, :, planted].mean(dim=0))
    assert stats.cls_high_norm_share == pytest.approx(float(found.cls_attention[:, planted].mean()), abs=1e-6)
    assert stats.summary()["slot_high_norm_share"] > 0 and "high_norm_share" in stats.per_slot()[0]
    clean = measure_slots(tiny_model("sparo").eval(), [images], "cpu")
    assert float(clean.high_norm_share.max()) == 0.0
