"""Slot statistics (one measurement for training, eval_knn --per_slot and visualize_sparo) and the SPARO options
that act on how the slots learn to separate."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_images, tiny_config

from dino_sparo.eval.slot_stats import SlotStatistics, measure_slots, pairwise_similarity, slot_statistics
from dino_sparo.models import SPARO, build_pretrained_backbone, vit_tiny
from dino_sparo.optim import get_params_groups
from dino_sparo.train import train_dino
from dino_sparo.train.schedules import build_schedules
from dino_sparo.train.slot_monitor import SlotMonitor


def test_statistics_against_hand_values():
    # 2 slots over CLS + 4 patches, 1 image: slot 0 half on CLS, rest uniform; slot 1 all on patch 2.
    attention = torch.tensor([[[0.5, 0.125, 0.125, 0.125, 0.125], [0.0, 0.0, 1.0, 0.0, 0.0]]])
    stats = slot_statistics(attention)
    torch.testing.assert_close(stats.peakedness, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(stats.cls_weight, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(stats.max_attention, torch.tensor([0.5, 1.0]))
    # cosine between (1,1,1,1)/2 and (0,1,0,0): 0.5
    assert stats.pairwise_similarity == pytest.approx(0.5)
    assert stats.summary() == pytest.approx({"slot_peakedness": 0.5, "slot_cls_weight": 0.25,
                                             "slot_max_attention": 0.75, "slot_pairwise_similarity": 0.5})


def test_pairwise_similarity_against_a_loop():
    maps = torch.rand(3, 5, 7)
    expected = torch.stack([torch.stack([F.cosine_similarity(maps[b, i], maps[b, j], dim=0)
                                         for i in range(5) for j in range(5) if i != j]).mean() for b in range(3)])
    torch.testing.assert_close(pairwise_similarity(maps), expected)
    assert pairwise_similarity(maps[:, :1]).tolist() == [1.0, 1.0, 1.0]


def test_means_over_parts_weight_by_images():
    attention = torch.softmax(torch.randn(5, 3, 10), dim=-1)
    whole = slot_statistics(attention)
    parts = SlotStatistics.mean([slot_statistics(attention[:2]), slot_statistics(attention[2:])])
    torch.testing.assert_close(parts.peakedness, whole.peakedness)
    assert parts.pairwise_similarity == pytest.approx(whole.pairwise_similarity) and parts.images == 5


def test_measure_slots_restores_training_mode():
    model = vit_tiny(patch_size=8, depth=2, sparo_slots=4, sparo_slot_dim=8).train()
    stats = measure_slots(model, [torch.randn(3, 3, 32, 32)], "cpu")
    assert model.training and stats.images == 3 and stats.peakedness.shape == (4,)


def test_initial_scales_of_queries_and_keys():
    torch.manual_seed(0)
    wide = SPARO(embed_dim=64, num_slots=32, slot_dim=8, attn_dim=16, query_init_std=3.0, key_init_gain=8.0)
    torch.manual_seed(0)
    paper = SPARO(embed_dim=64, num_slots=32, slot_dim=8, attn_dim=16, key_init_gain=1.0)
    torch.testing.assert_close(wide.queries, 3.0 * paper.queries)
    bound = math.sqrt(6 / (64 + 32 * 16))
    assert paper.key_proj.weight.abs().max() <= bound < wide.key_proj.weight.abs().max() <= 8 * bound


def test_readout_parameter_groups():
    model = vit_tiny(patch_size=8, depth=2, sparo_slots=4, sparo_slot_dim=8)
    default = get_params_groups(model)
    assert len(default) == 2 and default[0]["regularized"]
    assert any(p is model.sparo.queries for p in default[0]["params"])  # the reference decays 2-D parameters

    groups = get_params_groups(model, {"sparo_lr_mult": 10.0})
    sparo_params = {id(p) for p in model.sparo.parameters()}
    for group in groups:
        in_sparo = {id(p) in sparo_params for p in group["params"]}
        assert len(in_sparo) == 1 and (group.get("lr_mult", 1.0) == 10.0) == in_sparo.pop()
    decayed = {id(p) for group in groups if group.get("regularized") for p in group["params"]}
    for name in ("queries", "key_proj.weight", "out_proj.weight"):  # DINO's rule: every 2-D parameter decays
        assert id(model.sparo.get_parameter(name)) in decayed
    assert id(model.sparo.key_proj.bias) not in decayed and id(model.blocks[0].attn.qkv.weight) in decayed

    optimizer = torch.optim.AdamW(groups)
    args = tiny_config("u", "u", "--epochs", "1", "--warmup_epochs", "0")
    schedules = build_schedules(args, niter_per_epoch=2, world_size=1)
    schedules.apply(optimizer, 0)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(schedules.lr[0] * group.get("lr_mult", 1.0))
        assert group["weight_decay"] == (pytest.approx(schedules.weight_decay[0]) if group.get("regularized")
                                         else 0.0)


def test_training_logs_slot_statistics_and_maps(tmp_path):
    data = make_images(tmp_path / "data", count=8)
    out = tmp_path / "out"
    train_dino(tiny_config(data, out, "--epochs", "2", "--viz_freq", "1", "--sparo_lr_mult", "2"))
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(lines) == 2
    # The last epoch's figures are those of the saved teacher on the monitor's 16 fixed training images.
    teacher, _ = build_pretrained_backbone(str(out / "checkpoint.pth"), "teacher", {}, verbose=False)
    monitor = SlotMonitor(data, 32, torch.device("cpu"))
    assert len(monitor.images) == 8  # the set is smaller than 16: all of it
    expected = measure_slots(teacher, [monitor.images], "cpu").summary()
    assert {name: lines[-1][name] for name in expected} == pytest.approx(expected, abs=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "slots/most_peaked" in events.Tags()["images"]
    assert len(events.Images("slots/most_peaked")) == 2
    assert [e.step for e in events.Scalars("slots/slot_pairwise_similarity")] == [0, 1]
