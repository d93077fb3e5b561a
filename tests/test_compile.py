"""``--compile`` (each transformer block compiled by inductor, here with the machine's C compiler): the compiled
step computes what the eager one does, and training, resuming and a retrofit work with it. Slow: compiling takes
about a minute on 2 cores."""
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_images, tiny_args

from dino_sparo.loss import DINOLoss
from dino_sparo.optim import build_optimizer, get_params_groups
from dino_sparo.train import train_dino
from dino_sparo.train.setup import build_models
from dino_sparo.train.step import TrainStep

pytestmark = pytest.mark.slow


def one_step(readout: str, compiled: bool):
    args = tiny_args("unused", "unused", "--readout", readout, "--precision", "fp32", "--drop_path_rate", "0",
                     "--compile", str(compiled).lower(), "--patch_size", "8")
    torch.manual_seed(0)
    student, teacher = build_models(args, torch.device("cpu"))
    loss_fn = DINOLoss(args.out_dim, 4, args.warmup_teacher_temp, args.teacher_temp, 0, args.epochs)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student, args), torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    step = TrainStep(args, student, student, teacher, loss_fn, optimizer, None, "fp32", torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
    loss = step(crops, epoch=1, momentum=0.99)["loss"]
    return loss, torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


@pytest.mark.parametrize("readout", ["cls", "sparo"])
def test_the_compiled_step_equals_the_eager_step(readout):
    eager_loss, eager_grads = one_step(readout, compiled=False)
    compiled_loss, compiled_grads = one_step(readout, compiled=True)
    assert abs(float(compiled_loss - eager_loss)) <= 1e-4 * abs(float(eager_loss))
    assert compiled_grads.shape == eager_grads.shape
    assert float(F.cosine_similarity(compiled_grads, eager_grads, dim=0)) > 0.999


def test_training_resuming_and_a_retrofit_work_compiled(tmp_path):
    images = make_images(tmp_path / "images", count=8, size=32)
    out = tmp_path / "out"
    common = ("--precision", "fp32", "--compile", "true", "--patch_size", "8")
    train_dino(tiny_args(images, out, "--epochs", "1", *common))
    resumed = train_dino(tiny_args(images, out, "--epochs", "2", *common))
    assert resumed.start_epoch == 1
    with open(out / "log.txt") as handle:
        assert [json.loads(line)["epoch"] for line in handle] == [0, 1]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    eager, _ = build_models(tiny_args(images, out, "--patch_size", "8"), torch.device("cpu"))
    assert saved["student"].keys() == eager.state_dict().keys()  # compiling leaves the parameter names alone

    retrofit = train_dino(tiny_args(images, tmp_path / "retrofit", "--epochs", "1", "--init_from",
                                    str(out / "checkpoint.pth"), "--freeze_blocks", "all", *common))
    frozen = retrofit.student.backbone.blocks[0].attn.qkv.weight
    torch.testing.assert_close(frozen, saved["teacher"]["backbone.blocks.0.attn.qkv.weight"])
