"""The benchmark's baseline runs as facebookresearch/dino does by default: fp16 autocast with a GradScaler on a GPU
(here its logic under CPU autocast), fp32 on a CPU."""
import pytest
import torch
from helpers import tiny_config

from benchmarks.reference_step import ReferenceStep, reference_precision
from dino_sparo.loss import DINOLoss
from dino_sparo.optim import get_params_groups
from dino_sparo.train.build import build_models


def reference_update(precision: str, clip_grad: float = 3.0, init_scale: float | None = None):
    args = tiny_config("unused", "unused", "--precision", "fp32", "--drop_path_rate", "0", "--patch_size", "8")
    torch.manual_seed(0)
    student, teacher = build_models(args, torch.device("cpu"))
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    loss_fn = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, 10)
    groups = get_params_groups(student, args.model.readout_options)
    step = ReferenceStep(student, teacher, loss_fn, groups, clip_grad, 0, precision)
    if init_scale is not None:
        step.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    for group in step.optimizer.param_groups:
        group["lr"] = 1e-3
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
    loss = step(crops, 1, 0.99)
    after = torch.cat([p.detach().flatten() for p in student.parameters()])
    return loss, after - before, step


def test_the_reference_precision_is_fp16_on_a_gpu_and_fp32_on_a_cpu():
    assert reference_precision(torch.device("cuda", 0)) == "fp16"
    assert reference_precision(torch.device("cpu")) == "fp32"


def test_fp16_baseline_scales_the_loss_unscales_before_clipping_and_steps_through_the_scaler():
    fp32_loss, fp32_update, _ = reference_update("fp32")
    fp16_loss, fp16_update, step = reference_update("fp16", init_scale=8.0)
    assert step.scaler.get_scale() == 8.0  # finite gradients: the step was taken, the scale kept
    assert fp16_loss == pytest.approx(fp32_loss, rel=2e-2)
    # Unscaled before the clipping: the update has the fp32 size, not 2**16 times it.
    assert fp16_update.norm() > 0
    assert float((fp16_update - fp32_update).norm() / fp32_update.norm()) < 0.2


def test_the_baseline_refuses_a_precision_the_reference_does_not_have():
    with pytest.raises(ValueError, match="fp32 or fp16"):
        reference_update("bf16")


def test_fp16_baseline_skips_a_step_whose_scaled_gradients_overflow_as_the_reference_does():
    """At GradScaler's default initial scale (2**16) this tiny model's fp16 gradients overflow: the step is
    skipped (no update) and the scale halved, as in the first steps of a reference fp16 run."""
    _, update, step = reference_update("fp16")
    assert float(update.abs().max()) == 0.0 and step.scaler.get_scale() == 2.0 ** 15
