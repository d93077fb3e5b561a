"""``python -m dino_sparo.export`` and the torch.hub entry points: an export reads back to the same features through
``--pretrained_weights`` and torch.hub, and nothing is read or downloaded unless asked."""
import json
import os

import pytest
import torch
from helpers import ROOT, TINY_MODEL, one_line_error, write_main_dino_checkpoint
from safetensors.torch import load_file, save_file

from dino_sparo import export
from dino_sparo.models import build_pretrained_backbone

IMAGES = torch.randn(2, 3, 32, 32)


def features(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGES)


@pytest.fixture
def exported(tmp_path):
    checkpoint = tmp_path / "checkpoint.pth"
    write_main_dino_checkpoint(str(checkpoint), sparo_slots=5)
    export.main([str(checkpoint), str(tmp_path / "exports" / "teacher")])
    return checkpoint, tmp_path / "exports" / "teacher.safetensors"


def test_an_export_holds_the_teacher_backbone_and_its_config(exported):
    checkpoint, weights = exported
    teacher, config = build_pretrained_backbone(str(checkpoint), "teacher", {}, verbose=False)
    assert load_file(str(weights)).keys() == teacher.state_dict().keys()
    saved = json.loads((weights.parent / "teacher.json").read_text())
    assert saved["arch"] == TINY_MODEL["arch"] and saved["sparo_slots"] == 5 and saved["depth"] == config.depth
    exported_model, exported_config = build_pretrained_backbone(str(weights), "teacher", {}, verbose=False)
    assert exported_config == config
    torch.testing.assert_close(features(exported_model), features(teacher), atol=0, rtol=0)


def test_the_json_beside_a_safetensors_file_gives_its_config(exported, tmp_path):
    _, weights = exported
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(weights)), str(bare))  # no metadata
    (tmp_path / "bare.json").write_text((weights.parent / "teacher.json").read_text())
    _, config = build_pretrained_backbone(str(bare), "teacher", {}, verbose=False)
    assert config.readout_options["sparo_slots"] == 5


def test_torch_hub_builds_our_models_and_reads_exports_and_checkpoints(exported):
    checkpoint, weights = exported
    hubconf = torch.hub._import_module("hubconf", os.path.join(ROOT, "hubconf.py"))  # as torch.hub.load reads it
    entry_points = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert {"dino_sparo_vits16", "dino_sparo_vitb16", "dino_sparo_vits14_dinov2",
            "dino_sparo_vitg14_reg_dinov2", "dino_sparo_vitl16_dinov3"} <= entry_points
    # torch.hub.list shows these names: nothing but the entry points (no imported helpers such as Any or urlparse)
    assert all(name.startswith("dino_sparo_") for name in entry_points), sorted(entry_points)
    fresh = torch.hub.load(ROOT, "dino_sparo_vits16", source="local", depth=2)
    assert fresh.readout == "sparo" and len(fresh.blocks) == 1 and not fresh.training
    dinov2 = torch.hub.load(ROOT, "dino_sparo_vits14_reg_dinov2", source="local", depth=2, readout="cls")
    assert dinov2.num_registers == 4 and dinov2.patch_embed.patch_size == (14, 14)
    dinov3 = torch.hub.load(ROOT, "dino_sparo_vits16_dinov3", source="local", depth=2)
    assert dinov3.num_registers == 4 and dinov3(torch.randn(1, 3, 32, 32)).shape == (1, dinov3.feature_dim)
    reference, _ = build_pretrained_backbone(str(checkpoint), "teacher", {}, verbose=False)
    tiny = {"depth": TINY_MODEL["depth"], "sparo_slot_dim": TINY_MODEL["sparo_slot_dim"]}
    for source in (weights, checkpoint):
        model = torch.hub.load(ROOT, "dino_sparo_vits16", source="local", pretrained=str(source), arch="vit_tiny",
                               patch_size=TINY_MODEL["patch_size"], **tiny)
        assert all(param.requires_grad for param in model.parameters())
        # with gradients on, attention may take another kernel: equal to rounding
        torch.testing.assert_close(features(model), features(reference), atol=1e-6, rtol=1e-5)


def test_pretrained_true_is_refused_since_no_weights_are_published():
    with pytest.raises(ValueError, match="needs a path or URL"):
        torch.hub.load(ROOT, "dino_sparo_vits16", source="local", pretrained=True)


def test_exporting_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    error = one_line_error(export.main, [str(tmp_path / "nothing.pth"), str(tmp_path / "out")], capsys)
    assert "checkpoint not found" in error
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_an_export_with_its_head_starts_a_run_from_backbone_read_out_and_head(tmp_path):
    """Unlike Meta's releases (backbones only), ``--with_head`` exports what continuing self-supervised training
    needs: --init_from the export gives the student every tensor of the source teacher, head included."""
    from helpers import make_images, tiny_config

    from dino_sparo.checkpoint import load_student_weights
    from dino_sparo.train import train_dino
    from dino_sparo.train.build import build_models

    data = make_images(tmp_path / "data", count=8)
    train_dino(tiny_config(data, tmp_path / "run", "--epochs", "1"))
    export.main([str(tmp_path / "run" / "checkpoint.pth"), str(tmp_path / "full"), "--with_head"])
    config = json.loads((tmp_path / "full.json").read_text())
    assert config["out_dim"] == 256 and config["head_bottleneck_dim"] == 32 and config["sparo_slots"] == 4
    source = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["teacher"]
    torch.manual_seed(1)  # another initialisation than the source's
    student, _ = build_models(tiny_config(data, tmp_path / "next"), torch.device("cpu"))
    load_student_weights(student, str(tmp_path / "full.safetensors"), verbose=False)
    state = student.state_dict()
    assert state.keys() == source.keys()
    for name, value in source.items():
        assert torch.equal(state[name], value), name


def test_exporting_the_head_of_weights_without_one_is_a_one_line_error(tmp_path, capsys):
    write_main_dino_checkpoint(str(tmp_path / "checkpoint.pth"))  # its args lack the head's sizes
    error = one_line_error(export.main, [str(tmp_path / "checkpoint.pth"), str(tmp_path / "out"), "--with_head"],
                           capsys)
    assert "has no DINO head to export with its flags" in error and not os.path.exists(tmp_path / "out.safetensors")
