"""Retrofitting SPARO onto a trained model: frozen embeddings and blocks, shared between student and teacher."""
import pytest
import torch
from helpers import make_images, tiny_config

from dino_sparo.checkpoint import save_atomic
from dino_sparo.errors import UserError
from dino_sparo.models import DINOHead, MultiCropWrapper, vit_tiny
from dino_sparo.train import train_dino
from dino_sparo.train.build import build_models, build_training


def test_forward_from_frozen_tokens_equals_the_forward():
    model = vit_tiny(patch_size=8, depth=4, sparo_slots=4, sparo_slot_dim=8).eval()
    images = torch.randn(2, 3, 32, 32)
    for blocks in range(len(model.blocks) + 1):
        torch.testing.assert_close(model.forward_from(model.frozen_tokens(images, blocks), blocks), model(images))


def test_freezing_marks_the_frozen_blocks_and_turns_off_their_stochastic_depth():
    model = vit_tiny(patch_size=8, depth=4, drop_path_rate=0.3, sparo_slots=4, sparo_slot_dim=8)
    model.freeze_blocks(2)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= frozen
    assert all(name.startswith(("blocks.0.", "blocks.1.", "cls_token", "pos_embed", "patch_embed.")) for name in frozen)
    assert not any(name.startswith("blocks.2.") or name.startswith("sparo.") for name in frozen)
    assert all(isinstance(block.drop_path1, torch.nn.Identity) for block in model.blocks[:2])
    assert not isinstance(model.blocks[2].drop_path1, torch.nn.Identity)
    with pytest.raises(ValueError, match="keeps 3 before its read-out"):
        model.freeze_blocks(4)


def _step(shared: bool):
    """One step of a tiny student/teacher with 2 of 3 blocks frozen, the frozen tokens shared or not."""
    args = tiny_config("u", "u", "--freeze_blocks", "2", "--optimizer", "sgd", "--drop_path_rate", "0",
                     "--freeze_last_layer", "0", "--precision", "fp32")
    torch.manual_seed(0)
    step = build_training(args)
    student, teacher = step.student_module, step.teacher
    for group in step.optimizer.param_groups:
        group["lr"] = 0.1
    if not shared:  # the same frozen models, each running its own frozen blocks
        step.frozen_blocks = None
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, size, size, generator=generator) for size in (32, 32, 16, 16)]
    values = step([crops], epoch=1, momentum=0.9)
    grads = {name: param.grad.clone() for name, param in student.named_parameters() if param.grad is not None}
    return values["loss"], grads, student, teacher


def test_shared_frozen_tokens_step_equals_the_unshared_computation():
    """Loss and gradients of the shared-frozen-tokens step equal those of running student and teacher separately through
    their (identical) frozen blocks."""
    shared_loss, shared_grads, student, teacher = _step(shared=True)
    plain_loss, plain_grads, _, _ = _step(shared=False)
    torch.testing.assert_close(shared_loss, plain_loss)
    assert shared_grads.keys() == plain_grads.keys()
    assert not any(name.startswith(("backbone.blocks.0.", "backbone.blocks.1.", "backbone.patch_embed"))
                   for name in shared_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_retrofit_training_keeps_frozen_weights_bit_identical(tmp_path, capsys):
    """--init_from a CLS checkpoint, --readout sparo, --freeze_blocks all: the shared blocks come from the
    checkpoint and stay bit-identical in student and teacher; only read-out, final norm and head are optimised."""
    data = make_images(tmp_path / "data", count=8)
    donor = MultiCropWrapper(vit_tiny(depth=3, readout="cls"), DINOHead(192, 256, hidden_dim=64, bottleneck_dim=32))
    save_atomic({"teacher": donor.state_dict()}, tmp_path / "cls.pth")
    result = train_dino(tiny_config(data, tmp_path / "out", "--epochs", "2", "--init_from", tmp_path / "cls.pth",
                                  "--freeze_blocks", "all", "--drop_path_rate", "0.2"))
    assert "2 blocks frozen (retrofit)" in capsys.readouterr().out
    donor_state = donor.backbone.state_dict()
    for model in (result.student, result.teacher):
        state = model.backbone.state_dict()
        for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                     "blocks.1.mlp.fc2.weight"):
            assert torch.equal(state[name], donor_state[name]), name
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    optimised = sum(len(group["params"]) for group in checkpoint["optimizer"]["param_groups"])
    trainable = [name for name, p in result.student.named_parameters() if p.requires_grad]
    # the read-out, the head and the final norm (which now normalises another block's output) train
    assert optimised == len(trainable)
    assert all(name.startswith(("backbone.sparo.", "backbone.norm.", "head.")) for name in trainable)
    assert set(checkpoint["student"]) == set(result.student.state_dict())  # the usual, full format


@pytest.mark.parametrize("value, message", [("3", "--freeze_blocks 3 is out of range: this model keeps 2 blocks"),
                                            ("-1", None)])
def test_freeze_blocks_out_of_range_is_a_one_line_error(tmp_path, value, message):
    if message is None:
        with pytest.raises(SystemExit):  # argparse: not a number of blocks
            tiny_config("d", "o", "--freeze_blocks", value)
        return
    with pytest.raises(UserError, match=message) as error:
        train_dino(tiny_config(make_images(tmp_path / "data", count=4), tmp_path / "out", "--freeze_blocks", value))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags, gain, announced", [(("--freeze_blocks", "all"), 1.0, True),
                                                    (("--freeze_blocks", "1"), 1.0, True),
                                                    ((), 4.0, False),
                                                    (("--freeze_blocks", "all", "--sparo_key_init_gain", "4"), 4.0,
                                                     False)])
def test_a_retrofit_defaults_to_key_gain_1_and_says_so(flags, gain, announced):
    """Left unset, SPARO's key gain is 1 in a --freeze_blocks run (4 from scratch), announced like the other
    resolved defaults and saved with the run's args; an explicit value wins."""
    resolved = tiny_config("data", "out", *flags)
    assert resolved.model.readout_options["sparo_key_init_gain"] == gain
    assert resolved.to_dict()["sparo_key_init_gain"] == gain
    assert any("--sparo_key_init_gain 1" in line for line in resolved.notes) == announced
    torch.manual_seed(0)
    student, _ = build_models(resolved, torch.device("cpu"))
    torch.manual_seed(0)
    expected = build_models(tiny_config("data", "out", "--sparo_key_init_gain", str(gain)), torch.device("cpu"))[0]
    torch.testing.assert_close(student.backbone.sparo.key_proj.weight, expected.backbone.sparo.key_proj.weight)
