"""Starting from DINOv2 weights: timm's DINOv2 models and the official checkpoint layout load into our backbones and
give timm's own features; the architecture is inferred from the weights; SPARO retrofits onto frozen DINOv2 blocks;
safetensors files and bad inputs."""
import re

import pytest
import timm
import torch
from helpers import make_images, one_line_error, tiny_args
from safetensors.torch import save_file

import eval_knn
from dino_sparo.checkpoint import load_pretrained_weights, read_weights, save_atomic
from dino_sparo.errors import UserError
from dino_sparo.models import build_backbone, build_pretrained_backbone
from dino_sparo.train import train_dino

# (our arch, timm's model, timm's depth): depths cut to keep the test fast.
DINOV2 = [("dinov2_vits14", "vit_small_patch14_dinov2", 2), ("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 2),
          ("dinov2_vitg14", "vit_giant_patch14_dinov2", 1)]
IMAGE = 56  # 4x4 patches of 14 px: position embeddings resampled from DINOv2's 37x37 grid


def timm_model(name: str, depth: int) -> torch.nn.Module:
    """A timm DINOv2 model with random weights everywhere (LayerScale and norms far from their initial values, so
    that no part can be skipped unnoticed)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=depth, num_classes=0, dynamic_img_size=True).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("gamma") or ("norm" in key and key.endswith("weight")):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.5 if key.endswith(("cls_token", "pos_embed", "reg_token")) else 0.05)
    return model


def timm_cls(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's CLS token after the final norm."""
    with torch.no_grad():
        return model.forward_features(images)[:, 0]


def official_layout(timm_state: dict[str, torch.Tensor], chunks: int = 1) -> dict[str, torch.Tensor]:
    """The state dict as facebookresearch/dinov2 saves it, written out from timm's documented conversion run
    backwards: ``register_tokens``, a CLS position embedding (timm folds it into ``cls_token`` for register models),
    ``mask_token`` and training checkpoints' chunked blocks."""
    state = {}
    depth = 1 + max(int(m.group(1)) for key in timm_state if (m := re.match(r"blocks\.(\d+)\.", key)))
    per_chunk = -(-depth // chunks)
    for key, value in timm_state.items():
        if (match := re.match(r"blocks\.(\d+)\.(.*)", key)) is not None:
            index, rest = int(match.group(1)), match.group(2)
            key = f"blocks.{index // per_chunk}.{index}.{rest}" if chunks > 1 else f"blocks.{index}.{rest}"
        state[key] = value.clone()
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        cls_position = torch.randn(1, 1, state["pos_embed"].shape[-1])
        state["cls_token"] = state["cls_token"] - cls_position
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def swiglu_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official giant's MLP names (``mlp.w12``, ``mlp.w3``)."""
    return {key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): value for key, value in state.items()}


def ours(arch: str, depth: int, path, **flags) -> torch.nn.Module:
    model = build_backbone({"arch": arch, "depth": depth, "readout": "cls", "pos_embed_interpolation": "timm",
                            **flags}).eval()
    load_pretrained_weights(model, path, checkpoint_key=None, strict=True, verbose=False)
    return model


@pytest.mark.parametrize("arch, timm_name, depth", DINOV2)
def test_cls_features_equal_timms_from_timm_weights(tmp_path, arch, timm_name, depth):
    reference = timm_model(timm_name, depth)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        features = ours(arch, depth, tmp_path / "timm.pth")(images)
    torch.testing.assert_close(features, timm_cls(reference, images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, timm_name, depth", DINOV2)
def test_cls_features_equal_timms_from_official_dinov2_weights(tmp_path, arch, timm_name, depth):
    reference = timm_model(timm_name, depth)
    official = official_layout(reference.state_dict(), chunks=2 if depth > 1 else 1)
    if arch == "dinov2_vitg14":
        official = swiglu_names(official)
    torch.save(official, tmp_path / "official.pth")  # a bare state dict, as the hub's *_pretrain.pth files
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        features = ours(arch, depth, tmp_path / "official.pth")(images)
    torch.testing.assert_close(features, timm_cls(reference, images), atol=1e-5, rtol=0)


def test_safetensors_weights_load_like_the_pth_file(tmp_path):
    reference = timm_model("vit_small_patch14_reg4_dinov2", 2)
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        features = ours("dinov2_vits14_reg", 2, tmp_path / "model.safetensors")(images)
    torch.testing.assert_close(features, timm_cls(reference, images), atol=1e-5, rtol=0)


def test_the_architecture_is_inferred_from_official_weights(tmp_path, capsys):
    torch.save(official_layout(timm_model("vit_small_patch14_reg4_dinov2", 2).state_dict()), tmp_path / "w.pth")
    model, config = build_pretrained_backbone(str(tmp_path / "w.pth"), "teacher", {})
    assert (config["arch"], config["patch_size"], config["depth"], config["num_registers"], config["readout"]) == \
        ("dinov2_vits14_reg", 14, 2, 4, "cls")
    assert "unused from the checkpoint: mask_token" in capsys.readouterr().out
    assert model.num_registers == 4 and len(model.blocks) == 2


def test_a_load_prints_what_was_renamed(tmp_path, capsys):
    torch.save(official_layout(timm_model("vit_small_patch14_reg4_dinov2", 2).state_dict(), chunks=2),
               tmp_path / "w.pth")
    model = build_backbone({"arch": "dinov2_vits14_reg", "depth": 2, "readout": "cls"})
    report = load_pretrained_weights(model, tmp_path / "w.pth", checkpoint_key=None)
    out = capsys.readouterr().out
    assert "register_tokens loaded as reg_token" in out and "chunked blocks" in out
    assert report.unused == ["mask_token"] and not report.missing


def test_dinov2_weights_into_a_dino_vit_are_a_one_line_error(tmp_path):
    weights = timm_model("vit_small_patch14_dinov2", 2).state_dict()
    torch.save(weights, tmp_path / "w.pth")
    model = build_backbone({"arch": "vit_small", "patch_size": 14, "depth": 2, "readout": "cls"})
    with pytest.raises(UserError, match=r"pos_embed has shape \(1, 1370, 384\).*dinov2_\* for DINOv2 weights"):
        load_pretrained_weights(model, tmp_path / "w.pth", checkpoint_key=None)
    del weights["pos_embed"]  # as if the grids matched: the blocks still differ
    torch.save(weights, tmp_path / "w.pth")
    layer_scale = r"blocks\.\*\.ls1\.gamma, blocks\.\*\.ls2\.gamma;"
    with pytest.raises(UserError, match=f"another block architecture.*unused {layer_scale}") as error:
        load_pretrained_weights(model, tmp_path / "w.pth", checkpoint_key=None)
    assert "\n" not in str(error.value)
    dino = build_backbone({"arch": "vit_small", "patch_size": 14, "depth": 2, "readout": "cls"}).state_dict()
    del dino["pos_embed"]
    save_atomic({"teacher": dino}, tmp_path / "dino.pth")
    with pytest.raises(UserError, match=r"another block architecture.*missing blocks\.\*\.ls1\.gamma"):
        load_pretrained_weights(build_backbone({"arch": "dinov2_vits14", "depth": 2, "readout": "cls"}),
                                tmp_path / "dino.pth")


def test_dinov3_weights_are_refused_with_the_reason(tmp_path, capsys):
    state = {"cls_token": torch.zeros(1, 1, 384), "storage_tokens": torch.zeros(1, 4, 384),
             "rope_embed.periods": torch.ones(16), "patch_embed.proj.weight": torch.zeros(384, 3, 16, 16)}
    torch.save(state, tmp_path / "dinov3.pth")
    error = one_line_error(eval_knn.main, ["--pretrained_weights", str(tmp_path / "dinov3.pth"), "--data_path",
                                           str(tmp_path)], capsys)
    assert "DINOv3 weights" in error and "RoPE" in error


def test_registers_the_model_lacks_and_the_transformers_layout_are_one_line_errors(tmp_path):
    torch.save(official_layout(timm_model("vit_small_patch14_reg4_dinov2", 2).state_dict()), tmp_path / "reg.pth")
    with pytest.raises(UserError, match=r"unused reg_token; .*registers: a _reg one"):
        load_pretrained_weights(build_backbone({"arch": "dinov2_vits14", "depth": 2, "readout": "cls"}),
                                tmp_path / "reg.pth", checkpoint_key=None)
    torch.save({"embeddings.cls_token": torch.zeros(1, 1, 8), "encoder.layer.0.norm1.weight": torch.ones(8)},
               tmp_path / "hf.pth")
    with pytest.raises(UserError, match="Hugging Face transformers' layout"):
        read_weights(tmp_path / "hf.pth")


def test_a_corrupt_safetensors_file_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors file") as error:
        read_weights(tmp_path / "bad.safetensors")
    assert "\n" not in str(error.value)


def test_sparo_retrofits_onto_frozen_official_dinov2_blocks(tmp_path, capsys):
    """The README's command on small images: official-format random weights with registers, SPARO replacing the
    last block; the frozen weights stay bit-identical and the checkpoint keeps the full format."""
    official = official_layout(timm_model("vit_small_patch14_reg4_dinov2", 3).state_dict())
    torch.save(official, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    result = train_dino(tiny_args(make_images(tmp_path / "data", count=8, size=64), tmp_path / "out",
                                  "--arch", "dinov2_vits14_reg", "--depth", "3", "--patch_size", "14",
                                  "--readout", "sparo", "--global_crop_size", "28", "--local_crop_size", "14",
                                  "--epochs", "2", "--init_from", tmp_path / "dinov2_vits14_reg4_pretrain.pth",
                                  "--freeze_blocks", "all"))
    out = capsys.readouterr().out
    assert "2 blocks frozen (retrofit)" in out and "register_tokens loaded as reg_token" in out
    # our layout of the official tensors: the CLS position embedding is kept as DINOv2 has it
    expected = {"cls_token": official["cls_token"], "pos_embed": official["pos_embed"],
                "reg_token": official["register_tokens"], "blocks.0.ls1.gamma": official["blocks.0.ls1.gamma"],
                "blocks.1.mlp.fc2.weight": official["blocks.1.mlp.fc2.weight"],
                "patch_embed.proj.weight": official["patch_embed.proj.weight"]}
    for model in (result.student, result.teacher):
        state = model.backbone.state_dict()
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
    trainable = [name for name, p in result.student.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(("backbone.sparo.", "backbone.norm.", "head.")) for name in trainable)
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert set(checkpoint["teacher"]) == set(result.teacher.state_dict())
    assert checkpoint["args"]["arch"] == "dinov2_vits14_reg" and checkpoint["args"]["num_registers"] == 4
