import math

import pytest
import torch
import torch.nn.functional as F
from helpers import backbone_of

from benchmarks.reference_readouts import reference_forward
from dino_sparo.checkpoint import load_pretrained_weights
from dino_sparo.errors import UserError
from dino_sparo.models import SPARO, DINOHead, MultiCropWrapper, vit_small, vit_tiny


def reference_sparo(sparo: SPARO, tokens: torch.Tensor):
    """Independent per-slot loop of the SPARO maths (Vani et al., 2024): keys, softmax over tokens, pooling, W."""
    L, H = sparo.num_slots, sparo.attn_dim
    outputs, maps = [], []
    for slot in range(L):
        rows = slice(slot * H, (slot + 1) * H)
        keys = tokens @ sparo.key_proj.weight[rows].T + sparo.key_proj.bias[rows]
        if sparo.value_proj is None:
            values = keys
        else:
            values = tokens @ sparo.value_proj.weight[rows].T + sparo.value_proj.bias[rows]
        weights = torch.softmax(keys @ sparo.queries[slot] / math.sqrt(H), dim=1)  # (B, N)
        pooled = (weights.unsqueeze(-1) * values).sum(dim=1)
        out = pooled @ sparo.out_proj.weight.T + sparo.out_proj.bias
        if sparo.slot_norm:
            out = out / out.norm(dim=-1, keepdim=True) * math.sqrt(1 / L)
        outputs.append(out)
        maps.append(weights)
    return torch.cat(outputs, dim=1), torch.stack(maps, dim=1)


@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("slot_norm", [True, False])
def test_sparo_matches_per_slot_loop(share_kv, slot_norm):
    """The fast forward (which never builds every token's keys) and the benchmark baseline's per-token forward
    against an independent per-slot loop, for every flag and an initial temperature off the defaults."""
    sparo = SPARO(embed_dim=24, num_slots=5, slot_dim=7, attn_dim=8, share_kv=share_kv, slot_norm=slot_norm,
                  query_init_std=2.0, key_init_gain=3.0).double()
    tokens = torch.randn(3, 11, 24, dtype=torch.float64)
    encoding, attention = sparo(tokens, return_attention=True)
    expected, expected_maps = reference_sparo(sparo, tokens)
    torch.testing.assert_close(reference_forward(sparo, tokens), expected)
    assert encoding.shape == (3, 35) and attention.shape == (3, 5, 11)
    torch.testing.assert_close(encoding, expected)
    torch.testing.assert_close(attention, expected_maps)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 5, dtype=torch.float64))


def test_sparo_initialisation():
    sparo = SPARO(embed_dim=64, num_slots=16, slot_dim=8, attn_dim=32)
    assert torch.all(sparo.key_proj.bias == 0) and torch.all(sparo.out_proj.bias == 0)
    bound = 4 * math.sqrt(6 / (64 + 16 * 32))  # xavier-uniform with the default gain 4
    assert 0.9 * bound < sparo.key_proj.weight.abs().max() <= bound
    assert sparo.out_proj.weight.abs().max() <= math.sqrt(6 / (32 + 8))  # gain 1
    assert 0.8 < sparo.queries.std().item() < 1.2  # N(0, 1)


def test_slot_independence():
    sparo = SPARO(embed_dim=16, num_slots=4, slot_dim=6, attn_dim=5)
    tokens = torch.randn(2, 9, 16)
    before = sparo(tokens).view(2, 4, 6)
    with torch.no_grad():
        sparo.queries[2] += 1.0
        sparo.key_proj.weight[2 * 5:3 * 5] += 0.5
    after = sparo(tokens).view(2, 4, 6)
    changed = (after - before).abs().amax(dim=(0, 2))
    assert changed[2] > 1e-4
    assert torch.all(changed[[0, 1, 3]] == 0)


def test_slot_norm_gives_unit_encoding():
    L = 8
    sparo = SPARO(embed_dim=16, num_slots=L, slot_dim=4, attn_dim=4, slot_norm=True)
    encoding = sparo(torch.randn(3, 7, 16))
    torch.testing.assert_close(encoding.view(3, L, 4).norm(dim=-1), torch.full((3, L), math.sqrt(1 / L)))
    torch.testing.assert_close(encoding.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("patch_size", [8, 16])
def test_backbone_api_shapes_at_any_input_size(patch_size):
    """The public API at DINO's crop sizes and a non-square input (each read-out's own shapes and maps:
    tests/test_readouts.py)."""
    model = vit_tiny(patch_size=patch_size, depth=3, readout="sparo", sparo_slots=6, sparo_slot_dim=5)
    assert model.embed_dim == 192 and model.feature_dim == 30 and len(model.blocks) == 2
    for size in ((224, 224), (96, 96), (64, 96)):
        assert model(torch.randn(1, 3, *size)).shape == (1, 30)
    tokens = 1 + (96 // patch_size) ** 2
    images = torch.randn(2, 3, 96, 96)
    assert model.get_last_selfattention(images).shape == (2, 3, tokens, tokens)
    layers = model.get_intermediate_layers(images, n=2)
    assert len(layers) == 2 and layers[-1].shape == (2, tokens, 192)
    maps = model.get_slot_attention(images)
    assert maps.shape == (2, 6, tokens)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 6))


def test_sparo_defaults_and_parameter_budget():
    model = vit_small(patch_size=16, readout="sparo")
    assert model.sparo.attn_dim == 64 and model.sparo.num_slots == 64 and model.sparo.slot_dim == 64
    assert model.feature_dim == 64 * 64 and len(model.blocks) == 11
    sparo_params = sum(p.numel() for p in model.sparo.parameters())
    block_params = sum(p.numel() for p in vit_small(readout="cls").blocks[-1].parameters())
    print(f"ViT-S/16: SPARO {sparo_params:,} parameters vs replaced block {block_params:,}")
    assert sparo_params == 64 * 64 + 384 * 4096 + 4096 + 64 * 64 + 64
    assert sparo_params <= block_params


def test_cls_readout_equals_hand_computation():
    model = vit_tiny(depth=2, readout="cls").eval()
    images = torch.randn(2, 3, 224, 224)
    patches = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)
    tokens = torch.cat([model.cls_token.expand(2, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    tokens = tokens + model.pos_embed
    for block in model.blocks:
        tokens = block(tokens)
    expected = F.layer_norm(tokens, (192,), model.norm.weight, model.norm.bias, eps=1e-6)[:, 0]
    torch.testing.assert_close(model(images), expected)
    gap = vit_tiny(depth=2, readout="gap").eval()
    gap.load_state_dict(model.state_dict())
    torch.testing.assert_close(gap(images), F.layer_norm(tokens, (192,), model.norm.weight, model.norm.bias,
                                                         eps=1e-6)[:, 1:].mean(1))


def test_pos_embed_resampling_is_the_reference_one():
    model = vit_tiny(depth=1, readout="cls")
    grid = model.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    # (6 + 0.1) / 14 as scale factor samples at the same coordinates as size=6 would with scale 6/14 ... only
    # approximately: the reference's coordinates use the scale factor, so check against it directly.
    reference = F.interpolate(grid, scale_factor=(6.1 / 14, 6.1 / 14), mode="bicubic", align_corners=False)
    from dino_sparo.models.vision_transformer import _resample_pos_embed_dino
    resampled = _resample_pos_embed_dino(model.pos_embed, 6, 6)
    assert resampled.shape == (1, 37, 192)
    torch.testing.assert_close(resampled[:, 1:], reference.permute(0, 2, 3, 1).reshape(1, 36, 192))
    assert not torch.allclose(reference, expected)  # the offset matters, so this check is not vacuous
    timm_model = vit_tiny(depth=1, readout="cls", pos_embed_interpolation="timm")
    timm_model.load_state_dict(model.state_dict())
    small = torch.randn(1, 3, 96, 96)
    assert not torch.allclose(model(small), timm_model(small))
    big = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model(big), timm_model(big))


def test_dino_format_checkpoint_loads_with_report(tmp_path, capsys):
    dino_backbone = backbone_of(arch="vit_tiny", depth=4, readout="cls")
    old_head = torch.nn.Linear(256, 32, bias=False)
    with pytest.warns(FutureWarning):  # the deprecated API is what wrote reference checkpoints
        old_head = torch.nn.utils.weight_norm(old_head)
    head_state = {f"head.last_layer.{k}": v for k, v in old_head.state_dict().items()}
    head_state["head.mlp.0.weight"] = torch.randn(2048, 192)
    teacher = {f"backbone.{k}": v for k, v in dino_backbone.state_dict().items()} | head_state
    student = {f"module.{k}": v for k, v in teacher.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 3}, tmp_path / "dino.pth")

    model = backbone_of(arch="vit_tiny", depth=4, readout="sparo", sparo_slots=4, sparo_slot_dim=8)
    sparo_before = model.sparo.key_proj.weight.clone()
    report = load_pretrained_weights(model, tmp_path / "dino.pth", "teacher")
    printed = capsys.readouterr().out
    for index in range(3):
        torch.testing.assert_close(model.blocks[index].attn.qkv.weight, dino_backbone.blocks[index].attn.qkv.weight)
    torch.testing.assert_close(model.pos_embed, dino_backbone.pos_embed)
    assert all(k.startswith("blocks.3.") for k in report.unused) and report.unused
    assert all(k.startswith("sparo.") for k in report.missing) and report.missing
    assert torch.equal(model.sparo.key_proj.weight, sparo_before)
    assert "dropped block(s) 3" in printed and "SPARO" in printed and "head" in printed

    student_model = backbone_of(arch="vit_tiny", depth=4, readout="cls")
    load_pretrained_weights(student_model, tmp_path / "dino.pth", "student", verbose=False)
    torch.testing.assert_close(student_model.norm.weight, dino_backbone.norm.weight)

    with pytest.raises(UserError, match="has no key 'ema'.*student, teacher"):
        load_pretrained_weights(model, tmp_path / "dino.pth", "ema")
    wrong = backbone_of(arch="vit_small", depth=4, readout="cls")
    with pytest.raises(UserError, match="does not match"):
        load_pretrained_weights(wrong, tmp_path / "dino.pth", "teacher")

    head = DINOHead(192, 32)
    head.last_layer.load_state_dict(old_head.state_dict())
    features = torch.randn(3, 256)
    torch.testing.assert_close(head.last_layer(features), old_head(features))


def test_pickled_object_checkpoint_is_refused(tmp_path):
    import argparse
    torch.save({"teacher": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="refusing to load"):
        load_pretrained_weights(vit_tiny(depth=2), tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_pretrained_weights(vit_tiny(depth=2), tmp_path / "junk.pth")
    with pytest.raises(UserError, match="not found"):
        load_pretrained_weights(vit_tiny(depth=2), tmp_path / "missing.pth")


def test_dino_head():
    head = DINOHead(in_dim=40, out_dim=256, norm_last_layer=True, hidden_dim=64, bottleneck_dim=16)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.all(magnitude == 1)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(256))
    assert head(torch.randn(5, 40)).shape == (5, 256)
    trainable = DINOHead(in_dim=40, out_dim=256, norm_last_layer=False, use_bn=True, hidden_dim=64,
                         bottleneck_dim=16)
    assert trainable.last_layer.parametrizations.weight.original0.requires_grad
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in trainable.mlp)


def test_multicrop_wrapper_groups_by_resolution():
    backbone = vit_tiny(depth=2, readout="sparo", sparo_slots=4, sparo_slot_dim=8).eval()
    wrapper = MultiCropWrapper(backbone, DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16)).eval()
    calls = []
    backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    crops = [torch.randn(2, 3, 64, 64) for _ in range(2)] + [torch.randn(2, 3, 32, 32) for _ in range(3)]
    out = wrapper(crops)
    assert out.shape == (10, 64) and calls == [4, 6]
    expected = torch.cat([wrapper.head(backbone(crop)) for crop in crops])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_gradients_reach_sparo_parameters():
    model = vit_tiny(depth=2, readout="sparo", sparo_slots=4, sparo_slot_dim=8)
    model(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    for name in ("queries", "key_proj.weight", "key_proj.bias", "out_proj.weight"):
        grad = model.sparo.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_cls_token_starts_as_dino_does():
    """DINO initialises the CLS token with trunc_normal std 0.02 (timm uses 1e-6, which matters for --readout cls
    from scratch)."""
    torch.manual_seed(0)
    std = torch.stack([vit_tiny(depth=1, readout="cls").cls_token.std() for _ in range(8)]).mean()
    assert 0.017 < std < 0.023


def test_deit_arch_aliases_and_unsupported_archs():
    from dino_sparo.train.config import parse_args

    assert parse_args(["--arch", "deit_small"]).arch == "vit_small"
    assert parse_args(["--arch", "deit_tiny"]).arch == "vit_tiny"
    assert backbone_of(arch="deit_tiny", depth=2).embed_dim == 192
    with pytest.raises(SystemExit):
        parse_args(["--arch", "xcit_small_12_p16"])


def test_reference_named_head_loads_through_init_from_and_computes_dinos_head(tmp_path):
    """A checkpoint as facebookresearch/dino writes it (``module.`` prefixes, ``head.mlp.*``,
    ``head.last_layer.weight_g/_v`` of the deprecated weight_norm) starts the student's backbone and head, and
    the head then computes DINO's: MLP with GELU, L2 normalisation, a linear layer of weight g * v / ||v||."""
    from dino_sparo.checkpoint import load_student_weights

    backbone = backbone_of(arch="vit_tiny", depth=2, readout="cls")
    generator = torch.Generator().manual_seed(3)
    mlp = {"mlp.0.weight": torch.randn(32, 192, generator=generator) * 0.05, "mlp.0.bias": torch.randn(32) * 0.1,
           "mlp.2.weight": torch.randn(32, 32, generator=generator) * 0.1, "mlp.2.bias": torch.randn(32) * 0.1,
           "mlp.4.weight": torch.randn(16, 32, generator=generator) * 0.1, "mlp.4.bias": torch.randn(16) * 0.1}
    weight_v = torch.randn(64, 16, generator=generator)
    weight_g = torch.rand(64, 1, generator=generator) + 0.5
    head_state = {**mlp, "last_layer.weight_v": weight_v, "last_layer.weight_g": weight_g}
    student_state = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}
    student_state |= {f"module.head.{k}": v for k, v in head_state.items()}
    torch.save({"student": student_state, "epoch": 100}, tmp_path / "dino_reference.pth")

    student = MultiCropWrapper(backbone_of(arch="vit_tiny", depth=2, readout="cls"),
                               DINOHead(192, 64, norm_last_layer=False, hidden_dim=32, bottleneck_dim=16))
    load_student_weights(student, tmp_path / "dino_reference.pth", "student", verbose=False)
    for name, value in backbone.state_dict().items():
        assert torch.equal(student.backbone.state_dict()[name], value), name

    features = torch.randn(5, 192, generator=generator)
    hidden = F.gelu(features @ mlp["mlp.0.weight"].T + mlp["mlp.0.bias"])
    hidden = F.gelu(hidden @ mlp["mlp.2.weight"].T + mlp["mlp.2.bias"])
    bottleneck = hidden @ mlp["mlp.4.weight"].T + mlp["mlp.4.bias"]
    bottleneck = bottleneck / bottleneck.norm(dim=1, keepdim=True)
    prototypes = weight_g * weight_v / weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(student.head(features), bottleneck @ prototypes.T, atol=1e-5, rtol=1e-5)
