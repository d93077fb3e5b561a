"""Continued training from trained weights: the second stage (--unfreeze_at) that ends a retrofit's freeze, its
schedule and parameter groups, and resuming across the switch."""
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import make_images, official_dinov3_layout, official_layout, timm_model, tiny_config

from dino_sparo.errors import UserError
from dino_sparo.optim import unfrozen_param_groups
from dino_sparo.train import train_dino
from dino_sparo.train.build import build_models
from dino_sparo.train.config import RECIPES_DIR, parse_config
from dino_sparo.train.schedules import build_schedules, peak_learning_rate

STAGES = ("--freeze_blocks", "all", "--unfreeze_at", "2", "--unfreeze_warmup", "3", "--drop_path_rate", "0.1")


def test_the_backbone_schedule_ramps_from_the_switch_and_decays_with_the_rest():
    config = tiny_config("d", "o", *STAGES, "--epochs", "4", "--backbone_lr", "1e-4", "--warmup_epochs", "1")
    schedules = build_schedules(config, niter_per_epoch=5, world_size=2)
    backbone, lr = schedules.backbone_lr, schedules.lr
    peak = 1e-4 * config.images_per_step(2) / 256
    assert np.all(backbone[:10] == 0)  # frozen for epochs 0 and 1
    ratio = lr / peak_learning_rate(config, 2)
    np.testing.assert_allclose(backbone[10:13], peak * np.array([1 / 3, 2 / 3, 1.0]) * ratio[10:13])
    np.testing.assert_allclose(backbone[13:], peak * ratio[13:])  # then the cosine of --lr, at its own scale
    assert backbone[-1] < backbone[13]


def test_unfrozen_groups_follow_the_backbone_with_dinov2s_layerwise_decay():
    config = tiny_config("d", "o", "--freeze_blocks", "all")
    student, _ = build_models(config, torch.device("cpu"))
    frozen = {name for name, param in student.named_parameters() if not param.requires_grad}
    groups = unfrozen_param_groups(student, frozen, layerwise_decay=0.5)
    assert sorted(id(p) for g in groups for p in g["params"]) == \
        sorted(id(p) for name, p in student.named_parameters() if name in frozen)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    blocks = len(student.backbone.blocks)  # 2: SPARO replaced the last of 3
    assert all(g["backbone"] for g in groups)
    assert by_param[id(named["backbone.blocks.1.attn.qkv.weight"])]["lr_mult"] == 0.5  # the last block: decay^1
    assert by_param[id(named["backbone.blocks.0.attn.qkv.weight"])]["lr_mult"] == 0.5 ** blocks
    assert by_param[id(named["backbone.cls_token"])]["lr_mult"] == 0.5 ** (blocks + 1)
    assert by_param[id(named["backbone.blocks.0.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["backbone.blocks.0.attn.qkv.weight"])]["regularized"]


def test_the_second_stage_trains_the_backbone_and_keeps_the_read_outs_optimizer_state(tmp_path, capsys):
    data = make_images(tmp_path / "data", count=8)
    out = tmp_path / "out"
    initial, _ = build_models(tiny_config(data, out, "--freeze_blocks", "all"), torch.device("cpu"))
    initial_state = {name: value.clone() for name, value in initial.state_dict().items()}
    result = train_dino(tiny_config(data, out, *STAGES, "--epochs", "3", "--saveckp_freq", "1"))
    assert "epoch 2: the backbone is unfrozen (--unfreeze_at 2)" in capsys.readouterr().out
    assert [json.loads(line)["stage"] for line in (out / "log.txt").read_text().splitlines()] == [1, 1, 2]
    at_switch = torch.load(out / "checkpoint0001.pth", weights_only=True)
    final = torch.load(out / "checkpoint.pth", weights_only=True)
    assert "unfrozen" not in at_switch and final["unfrozen"]
    frozen_name = "backbone.blocks.0.mlp.fc1.weight"
    assert torch.equal(at_switch["student"][frozen_name], initial_state[frozen_name])  # stage 1 kept it
    for model in (result.student, result.teacher):  # stage 2 trained it; the teacher followed by EMA
        assert not torch.equal(model.state_dict()[frozen_name], initial_state[frozen_name])
    groups = final["optimizer"]["param_groups"]
    assert sum(bool(group.get("backbone")) for group in groups) >= 3
    # 2 steps per epoch: the read-out and the head's MLP stepped all 6 times (their state went on through the
    # switch), the head's last layer 4 (--freeze_last_layer 1), the unfrozen backbone 2 (its state began there)
    steps = [int(state["step"]) for state in final["optimizer"]["state"].values()]
    frozen = [name for name, param in initial.backbone.named_parameters() if not param.requires_grad]
    assert set(steps) == {6, 4, 2} and steps.count(2) == len(frozen)
    assert all(param.requires_grad for param in result.student.backbone.parameters())
    # the head's last-layer norm stays fixed (--norm_last_layer), as in any run
    assert not result.student.head.last_layer.parametrizations.weight.original0.requires_grad


RESUME_FLAGS = (*STAGES, "--epochs", "4", "--drop_path_rate", "0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("continued")
    data = make_images(root / "data", count=8)
    result = train_dino(tiny_config(data, root / "straight", *RESUME_FLAGS, "--saveckp_freq", "1"))
    return data, root / "straight", result


@pytest.mark.parametrize("resumed_from", [0, 1, 2])
def test_resuming_before_at_and_after_the_switch_equals_the_uninterrupted_run(uninterrupted, tmp_path, resumed_from):
    """checkpoint0000 is before the switch, checkpoint0001 ends the epoch before it (the switch comes first
    thing after resuming), checkpoint0002 after it (the backbone is unfrozen before the optimizer is restored)."""
    data, straight_dir, straight = uninterrupted
    (tmp_path / "resumed").mkdir()
    shutil.copy(straight_dir / f"checkpoint{resumed_from:04d}.pth", tmp_path / "resumed" / "checkpoint.pth")
    resumed = train_dino(tiny_config(data, tmp_path / "resumed", *RESUME_FLAGS))
    assert resumed.start_epoch == resumed_from + 1
    for part in ("student", "teacher"):
        theirs = getattr(resumed, part).state_dict()
        for name, value in getattr(straight, part).state_dict().items():
            assert torch.equal(value, theirs[name]), f"{part} {name}"


@pytest.mark.parametrize("flags, message", [
    (("--unfreeze_at", "1"), "--unfreeze_at ends a freeze: it needs --freeze_blocks"),
    (("--freeze_blocks", "all", "--unfreeze_at", "3", "--epochs", "3"), "--unfreeze_at 3 is not before the end"),
    (("--freeze_blocks", "all", "--unfreeze_at", "1", "--layerwise_decay", "1.5"), "--layerwise_decay must be"),
])
def test_a_second_stage_that_cannot_happen_is_a_one_line_error(flags, message):
    with pytest.raises(UserError, match=message):
        tiny_config("d", "o", *flags)


RECIPES = sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))
# What makes a recipe toy-sized on a CPU: tiny depth, crops, head and batch; every other value is the recipe's.
TOY = ["--depth", "3", "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
       "--sparo_slots", "4", "--sparo_slot_dim", "8", "--batch_size_per_gpu", "2", "--epochs", "2",
       "--local_crops_number", "2", "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu", "--precision",
       "fp32", "--log_freq", "1"]
RELEASED = {"dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2", official_layout),
            "dinov3_vits16": ("vit_small_patch16_dinov3_qkvb", official_dinov3_layout)}


def test_the_recipes_are_the_ones_documented():
    assert RECIPES == ["demo", "dinov2_vits14_reg_continue", "dinov3_vits16_continue", "vits16_1gpu",
                       "vits16_imagenet_8gpu"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_at_toy_size(recipe, tmp_path):
    """Each recipe file as users pass it, shrunk to a CPU toy (the continued-pretraining ones from official-layout
    weights with random values, their second stage starting at epoch 1), so that no recipe rots."""
    recipe_config = parse_config(["--config", recipe, "--data_path", "unused"])
    patch = recipe_config.model.patch_size
    flags = [*TOY, "--global_crop_size", 2 * patch, "--local_crop_size", patch]
    if recipe_config.unfreeze_at is not None:
        timm_name, layout = RELEASED[recipe_config.model.arch]
        torch.save(layout(timm_model(timm_name, 3).state_dict()), tmp_path / "released.pth")
        flags += ["--init_from", tmp_path / "released.pth", "--unfreeze_at", "1", "--unfreeze_warmup", "1"]
    needed = 2 * recipe_config.accum_steps  # two optimizer steps of batch 2 per epoch
    data = make_images(tmp_path / "data", count=needed, size=4 * patch)
    config = parse_config(["--config", recipe, "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                           *map(str, flags)])
    assert (config.accum_steps, config.momentum_teacher, config.model.arch) == \
        (recipe_config.accum_steps, recipe_config.momentum_teacher, recipe_config.model.arch)
    result = train_dino(config)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in log)
    if recipe_config.unfreeze_at is not None:
        assert [record["stage"] for record in log] == [1, 2]
        assert all(param.requires_grad for param in result.student.backbone.parameters())
