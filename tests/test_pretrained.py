"""Starting from DINOv2 and DINOv3 weights: timm's models and the official checkpoint layouts load into our backbones
and give timm's own features; the architecture is inferred from the weights; SPARO retrofits onto frozen blocks;
safetensors files and bad inputs."""

import pytest
import torch
from helpers import backbone_of, make_images, official_dinov3_layout, official_layout, timm_model, tiny_config
from safetensors.torch import save_file

from dino_sparo.checkpoint import load_pretrained_weights, read_weights, save_atomic
from dino_sparo.errors import UserError
from dino_sparo.models import build_pretrained_backbone
from dino_sparo.train import train_dino

# (our arch, timm's model, timm's depth): depths cut to keep the test fast.
DINOV2 = [("dinov2_vits14", "vit_small_patch14_dinov2", 2), ("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 2),
          ("dinov2_vitg14", "vit_giant_patch14_dinov2", 1)]
IMAGE = 56  # 4x4 patches of 14 px: position embeddings resampled from DINOv2's 37x37 grid


def timm_cls(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's CLS token after the final norm."""
    with torch.no_grad():
        return model.forward_features(images)[:, 0]


def swiglu_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official giant's MLP names (``mlp.w12``, ``mlp.w3``)."""
    return {key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): value for key, value in state.items()}


def ours(arch: str, depth: int, path, **flags) -> torch.nn.Module:
    # timm resamples DINOv2's position embeddings its own way; DINOv3's have none (RoPE)
    resampling = {} if arch.startswith("dinov3") else {"pos_embed_interpolation": "timm"}
    model = backbone_of(arch=arch, depth=depth, readout="cls", **resampling, **flags).eval()
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
    assert (config.arch, config.patch_size, config.depth, config.num_registers, config.readout) == \
        ("dinov2_vits14_reg", 14, 2, 4, "cls")
    out = capsys.readouterr().out
    assert "unused from the checkpoint: mask_token" in out and "register_tokens loaded as reg_token" in out
    assert model.num_registers == 4 and len(model.blocks) == 2


def test_a_load_prints_what_was_renamed(tmp_path, capsys):
    torch.save(official_layout(timm_model("vit_small_patch14_reg4_dinov2", 2).state_dict(), chunks=2),
               tmp_path / "w.pth")
    model = backbone_of(**{"arch": "dinov2_vits14_reg", "depth": 2, "readout": "cls"})
    report = load_pretrained_weights(model, tmp_path / "w.pth", checkpoint_key=None)
    out = capsys.readouterr().out
    assert "register_tokens loaded as reg_token" in out and "chunked blocks" in out
    assert report.unused == ["mask_token"] and not report.missing


def test_dinov2_weights_into_a_dino_vit_are_a_one_line_error(tmp_path):
    weights = timm_model("vit_small_patch14_dinov2", 2).state_dict()
    torch.save(weights, tmp_path / "w.pth")
    model = backbone_of(**{"arch": "vit_small", "patch_size": 14, "depth": 2, "readout": "cls"})
    with pytest.raises(UserError, match=r"pos_embed has shape \(1, 1370, 384\).*dinov2_\* for DINOv2 weights"):
        load_pretrained_weights(model, tmp_path / "w.pth", checkpoint_key=None)
    del weights["pos_embed"]  # as if the grids matched: the blocks still differ
    torch.save(weights, tmp_path / "w.pth")
    layer_scale = r"blocks\.\*\.ls1\.gamma, blocks\.\*\.ls2\.gamma;"
    with pytest.raises(UserError, match=f"another block architecture.*unused {layer_scale}") as error:
        load_pretrained_weights(model, tmp_path / "w.pth", checkpoint_key=None)
    assert "\n" not in str(error.value)
    dino = backbone_of(**{"arch": "vit_small", "patch_size": 14, "depth": 2, "readout": "cls"}).state_dict()
    del dino["pos_embed"]
    save_atomic({"teacher": dino}, tmp_path / "dino.pth")
    with pytest.raises(UserError, match=r"another block architecture.*missing blocks\.\*\.ls1\.gamma"):
        load_pretrained_weights(backbone_of(**{"arch": "dinov2_vits14", "depth": 2, "readout": "cls"}),
                                tmp_path / "dino.pth")


DINOV3 = [("dinov3_vits16", "vit_small_patch16_dinov3_qkvb"), ("dinov3_vits16", "vit_small_patch16_dinov3")]


@pytest.mark.parametrize("arch, timm_name", DINOV3)
def test_dinov3_cls_features_equal_timms_from_timm_and_official_weights(tmp_path, arch, timm_name):
    reference = timm_model(timm_name, 2)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    images = torch.randn(2, 3, 64, 48)  # a 4x3 grid: RoPE follows each input's own grid
    expected = timm_cls(reference, images)
    with torch.no_grad():
        torch.testing.assert_close(ours(arch, 2, tmp_path / "timm.pth")(images), expected, atol=1e-5, rtol=0)
    if timm_name.endswith("_qkvb"):
        torch.save(official_dinov3_layout(reference.state_dict()), tmp_path / "official.pth")
        with torch.no_grad():
            torch.testing.assert_close(ours(arch, 2, tmp_path / "official.pth")(images), expected, atol=1e-5, rtol=0)


def test_dinov3_attention_weights_are_the_ones_its_blocks_use():
    """The RoPE attention that inspection and the attention maps show reproduces the block's own attention output."""
    model = backbone_of(**{"arch": "dinov3_vits16", "depth": 2, "readout": "sparo"}).eval()
    tokens, kwargs = model.embed(torch.randn(2, 3, 48, 64))
    block = model.blocks[0]
    normed = block.norm1(tokens)
    with torch.no_grad():
        weights = model.attention_weights(block, normed, **kwargs)
        attn = block.attn
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = torch.nn.functional.linear(normed, attn.qkv.weight, bias)
        values = qkv.reshape(2, tokens.shape[1], 3, 6, -1)[:, :, 2]
        mixed = (weights @ values.transpose(1, 2)).transpose(1, 2).reshape(tokens.shape)
        torch.testing.assert_close(attn.proj(attn.norm(mixed)), attn(normed, **kwargs), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_the_dinov3_architecture_is_inferred_from_official_weights(tmp_path):
    torch.save(official_dinov3_layout(timm_model("vit_small_patch16_dinov3_qkvb", 2).state_dict()), tmp_path / "w.pth")
    model, config = build_pretrained_backbone(str(tmp_path / "w.pth"), "teacher", {}, verbose=False)
    assert (config.arch, config.patch_size, config.depth, config.num_registers, config.readout) == \
        ("dinov3_vits16", 16, 2, 4, "cls")
    unmasked = torch.load(tmp_path / "w.pth", weights_only=True)
    del unmasked["blocks.0.attn.qkv.bias_mask"]  # its random key bias is then really used: not a DINOv3 model
    torch.save(unmasked, tmp_path / "w.pth")
    with pytest.raises(UserError, match="blocks.0.attn.qkv.bias has a non-zero key bias"):
        read_weights(tmp_path / "w.pth")


def test_registers_the_model_lacks_and_the_transformers_layout_are_one_line_errors(tmp_path):
    torch.save(official_layout(timm_model("vit_small_patch14_reg4_dinov2", 2).state_dict()), tmp_path / "reg.pth")
    with pytest.raises(UserError, match=r"unused reg_token; .*registers: a _reg one"):
        load_pretrained_weights(backbone_of(**{"arch": "dinov2_vits14", "depth": 2, "readout": "cls"}),
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


RETROFITS = [  # (arch, timm model with its weights, official layout, expected frozen tensors: ours <- official)
    ("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", official_layout, 14,
     {"cls_token": "cls_token", "pos_embed": "pos_embed", "reg_token": "register_tokens",
      "blocks.0.ls1.gamma": "blocks.0.ls1.gamma", "blocks.1.mlp.fc2.weight": "blocks.1.mlp.fc2.weight"}),
    ("dinov3_vits16", "vit_small_patch16_dinov3_qkvb", official_dinov3_layout, 16,
     {"cls_token": "cls_token", "reg_token": "storage_tokens", "blocks.0.gamma_1": "blocks.0.ls1.gamma",
      "blocks.1.mlp.fc2.weight": "blocks.1.mlp.fc2.weight"}),
]


@pytest.mark.parametrize("arch, timm_name, layout, patch, frozen", RETROFITS)
def test_sparo_retrofits_onto_frozen_official_blocks(tmp_path, capsys, arch, timm_name, layout, patch, frozen):
    """The README's command on small images: official-format random weights (DINOv2 with registers, DINOv3),
    SPARO replacing the last block; the frozen weights stay bit-identical and the checkpoint keeps the full
    format."""
    official = layout(timm_model(timm_name, 3).state_dict())
    torch.save(official, tmp_path / "pretrain.pth")
    result = train_dino(tiny_config(make_images(tmp_path / "data", count=8, size=64), tmp_path / "out",
                                  "--arch", arch, "--depth", "3", "--patch_size", patch, "--readout", "sparo",
                                  "--global_crop_size", 2 * patch, "--local_crop_size", patch, "--epochs", "2",
                                  "--init_from", tmp_path / "pretrain.pth", "--freeze_blocks", "all"))
    out = capsys.readouterr().out
    assert "2 blocks frozen (retrofit)" in out and "loaded as reg_token" in out
    for model in (result.student, result.teacher):
        state = model.backbone.state_dict()
        for name, official_name in {**frozen, "patch_embed.proj.weight": "patch_embed.proj.weight"}.items():
            assert torch.equal(state[name], official[official_name]), name
    trainable = [name for name, p in result.student.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(("backbone.sparo.", "backbone.norm.", "head.")) for name in trainable)
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert set(checkpoint["teacher"]) == set(result.teacher.state_dict())
    assert checkpoint["args"]["arch"] == arch and checkpoint["args"]["num_registers"] == 4


def test_resampling_flags_do_not_apply_to_dinov3_but_older_saved_args_with_them_still_read():
    from dino_sparo.models import ModelConfig

    with pytest.raises(UserError, match="--pos_embed_interpolation does not apply to dinov3_vits16") as error:
        ModelConfig.resolve({"arch": "dinov3_vits16", "pos_embed_interpolation": "timm"})
    assert "\n" not in str(error.value)
    saved = ModelConfig.resolve({}, saved={"arch": "dinov3_vits16", "pos_embed_interpolation": "dino"})
    assert saved.pos_embed_interpolation is None and "pos_embed_interpolation" not in saved.model_kwargs()
    assert ModelConfig.resolve({"arch": "dinov2_vits14"}).pos_embed_interpolation == "dino"
