"""CUDA paths, run by ``pytest -m cuda`` (scripts/gpu_check.sh runs them on a GPU); skipped without one.

Each low-precision result is compared with fp32 on the same inputs and weights, with a stated tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_args

from dino_sparo.data.device_augment import DeviceAugmentation, StepViews
from dino_sparo.eval.features import extract_features
from dino_sparo.eval.knn import knn_classifier, sharded_knn
from dino_sparo.health import NonFiniteWatch
from dino_sparo.loss import DINOLoss
from dino_sparo.models import SPARO, vit_tiny
from dino_sparo.optim import build_optimizer, get_params_groups
from dino_sparo.train_setup import build_models, build_schedules, resolve_precision
from dino_sparo.train_step import AUTOCAST_DTYPES, TrainStep

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def make_step(precision: str, optimizer: str = "sgd"):
    """A tiny student/teacher step on the GPU, built from the same seed whatever the precision."""
    args = tiny_args("unused", "unused", "--device", "cuda", "--optimizer", optimizer, "--drop_path_rate", "0",
                     "--freeze_last_layer", "0", "--precision", precision)
    torch.manual_seed(0)
    student, teacher = build_models(args, CUDA)
    dino_loss = DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp, 0,
                         args.epochs).to(CUDA)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student), CUDA)
    for index, group in enumerate(optimizer.param_groups):
        group["lr"], group["weight_decay"] = 0.05, (0.04 if index == 0 else 0.0)
    # Initial scale 1: the default 65536 (even 256) overflows this untrained head's fp16 gradients (the
    # L2-normalised bottleneck divides them by its small norm), so the scaler would skip the first steps while it
    # calibrates, as in real runs, leaving nothing to compare after one step.
    scaler = torch.amp.GradScaler("cuda", init_scale=1.0) if precision == "fp16" else None
    step = TrainStep(args, student, student, teacher, dino_loss, optimizer, scaler, precision, CUDA)
    return step, student, teacher, args


def crops_for(args, batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * args.local_crops_number
    return [torch.randn(batch, 3, size, size, generator=generator).to(CUDA) for size in sizes]


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_one_training_step(precision):
    """Finite loss, student and teacher updated; bf16/fp16: loss within 2% of fp32's and the student's update
    (SGD, so the update is the clipped gradient) pointing the same way as fp32's (cosine > 0.95)."""
    reference, ref_student, _, args = make_step("fp32")
    before = flat(ref_student)
    ref_loss = reference(crops_for(args), epoch=1, momentum=0.99)["loss"]
    ref_update = flat(ref_student) - before

    step, student, teacher, _ = make_step(precision)
    teacher_before = flat(teacher)
    values = step(crops_for(args), epoch=1, momentum=0.99)
    assert math.isfinite(values["loss"].item()) and all(math.isfinite(v.item()) for v in values.values())
    update = flat(student) - before
    assert update.abs().max() > 0 and (flat(teacher) - teacher_before).abs().max() > 0
    assert values["loss"].item() == pytest.approx(ref_loss.item(), rel=0.02)
    assert F.cosine_similarity(update, ref_update, dim=0) > 0.95


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sparo_forward_and_backward_under_autocast(precision):
    """Encoding within 2% (relative L2) of fp32, attention rows summing to 1, gradients of every SPARO
    parameter within cosine 0.99 of fp32's."""
    torch.manual_seed(0)
    sparo = SPARO(embed_dim=192, num_slots=16, slot_dim=32, attn_dim=64).to(CUDA)
    tokens = torch.randn(8, 50, 192, device=CUDA)
    target = torch.randn(8, 16 * 32, device=CUDA)  # a fixed direction: the unit-norm encoding's norm is constant
    reference, ref_attention = sparo(tokens, return_attention=True)
    (reference * target).sum().backward()
    ref_grads = {name: p.grad.clone() for name, p in sparo.named_parameters()}
    sparo.zero_grad()
    with torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision]):
        encoding, attention = sparo(tokens, return_attention=True)
    (encoding.float() * target).sum().backward()
    assert (encoding.float() - reference).norm() / reference.norm() < 0.02
    torch.testing.assert_close(attention.float().sum(-1), torch.ones_like(ref_attention.sum(-1)), atol=1e-2, rtol=0)
    for name, param in sparo.named_parameters():
        assert F.cosine_similarity(param.grad.flatten().float(), ref_grads[name].flatten(), dim=0) > 0.99, name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_dino_loss_and_centre_under_autocast(precision):
    """The loss computes in float32 whatever autocast hands it: within 1e-3 of fp32, centre within 1e-3."""
    torch.manual_seed(0)
    student, teacher = torch.randn(4 * 6, 256, device=CUDA), torch.randn(2 * 6, 256, device=CUDA)
    reference_loss = DINOLoss(256, 4, 0.04, 0.04, 0, 10).to(CUDA)
    expected = reference_loss(student, teacher, 0)
    loss = DINOLoss(256, 4, 0.04, 0.04, 0, 10).to(CUDA)
    with torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision]):
        value = loss(student.to(AUTOCAST_DTYPES[precision]), teacher.to(AUTOCAST_DTYPES[precision]), 0)
    assert value.dtype == torch.float32 and loss.center.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), abs=1e-3, rel=1e-3)
    torch.testing.assert_close(loss.center, reference_loss.center, atol=1e-3, rtol=1e-2)


def test_feature_extraction_on_cuda_equals_cpu():
    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, depth=3, readout="sparo", sparo_slots=4, sparo_slot_dim=8).eval()
    batches = [(torch.randn(5, 3, 32, 32), torch.arange(5)) for _ in range(3)]
    on_cpu, labels_cpu = extract_features(model, batches, "cpu")
    on_cuda, labels_cuda = extract_features(model.to(CUDA), batches, CUDA)
    assert on_cuda.device.type == "cpu" and torch.equal(labels_cpu, labels_cuda)
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-4, rtol=1e-3)


def test_sharded_knn_on_cuda_equals_cpu():
    generator = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(500, 32, generator=generator), dim=1)
    test = F.normalize(train[:100] + 0.3 * torch.randn(100, 32, generator=generator), dim=1)
    train_labels = torch.randint(0, 7, (500,), generator=generator)
    test_labels = train_labels[:100]
    on_cpu = sharded_knn(train, train_labels, test, test_labels, [1, 10, 20], 0.07, 7)
    on_cuda = sharded_knn(train.to(CUDA), train_labels.to(CUDA), test.to(CUDA), test_labels.to(CUDA), [1, 10, 20],
                          0.07, 7)
    assert on_cuda == pytest.approx(on_cpu)
    assert on_cuda[20] == pytest.approx(knn_classifier(train, train_labels, test, test_labels, 20, 0.07, 7))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_iterations_never_wait_for_the_gpu(precision):
    """Between logging intervals nothing reads the device back: device-side augmentation of pinned uint8
    crops, schedules, the step (AdamW fused, GradScaler for fp16), the non-finite watch. Any host
    synchronisation in them raises under set_sync_debug_mode("error")."""
    step, _, _, args = make_step(precision, optimizer="adamw")
    views = StepViews(DeviceAugmentation(args.local_crops_number, args.global_crop_size), CUDA, CUDA, 0, 0)
    schedules = build_schedules(args, niter_per_epoch=8, world_size=1)
    watch = NonFiniteWatch(8, CUDA)
    generator = torch.Generator().manual_seed(0)
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * args.local_crops_number
    batch = [torch.randint(0, 256, (4, 3, s, s), dtype=torch.uint8, generator=generator).pin_memory() for s in sizes]

    def iteration(index: int) -> None:
        schedules.apply(step.optimizer, index)
        values = step(views(batch, index), epoch=1, momentum=float(schedules.momentum[index]))
        watch.update(values["loss"], index)

    for index in range(3):  # first steps: cuDNN autotuning, lazy initialisation, the GradScaler's first scale
        iteration(index)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index in range(3, 7):
            iteration(index)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    watch.raise_if_any(epoch=1)


def test_auto_precision_on_this_gpu_and_on_one_without_native_bf16(monkeypatch):
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert resolve_precision("auto", None, CUDA) == ("bf16" if native else "fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", None, CUDA) == "fp16"  # a V100 or T4: bf16 only emulated


def test_training_on_cuda_end_to_end(tmp_path):
    """One epoch through train_dino on the GPU: pinned loader, uint8 crops augmented on the GPU, fused AdamW,
    bf16 autocast, cudnn.benchmark, checkpoint written from GPU tensors and loadable on the CPU."""
    from PIL import Image

    from dino_sparo.train import train_dino

    data = tmp_path / "data"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(16):
        pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{index:02d}.png")
    result = train_dino(tiny_args(data, tmp_path / "out", "--device", "cuda", "--precision", "bf16", "--epochs", "1",
                                  "--num_workers", "2"))
    assert torch.backends.cudnn.benchmark
    assert next(result.teacher.parameters()).device.type == "cuda"
    assert math.isfinite(result.epoch_stats[0]["train_loss"])
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and all(t.device.type == "cpu" for t in checkpoint["teacher"].values())
