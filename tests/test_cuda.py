"""CUDA paths, run by ``pytest -m cuda`` (scripts/gpu_check.sh runs them on a GPU); skipped without one.

fp32 on the GPU is compared with fp32 on the CPU, with TF32 off (which otherwise rounds float32 matmul and
convolution inputs to 10 mantissa bits); each low-precision result with GPU fp32 on the same inputs and weights,
with a stated tolerance.
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
from dino_sparo.loss import DINOLoss
from dino_sparo.models import SPARO, vit_tiny
from dino_sparo.optim import build_optimizer, get_params_groups
from dino_sparo.train.health import NonFiniteWatch
from dino_sparo.train.schedules import build_schedules
from dino_sparo.train.setup import build_models, resolve_precision
from dino_sparo.train.step import AUTOCAST_DTYPES, TrainStep

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
MOMENTUM = 0.99


@pytest.fixture
def tf32_off(monkeypatch):
    """float32 matmuls and convolutions on the GPU in full float32, as on the CPU (restored afterwards)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def make_step(precision: str, optimizer: str = "sgd", device: torch.device = CUDA):
    """A tiny student/teacher step on ``device``, built from the same seed whatever the precision and device."""
    args = tiny_args("unused", "unused", "--device", device.type, "--optimizer", optimizer, "--drop_path_rate", "0",
                     "--freeze_last_layer", "0", "--precision", precision)
    torch.manual_seed(0)
    student, teacher = build_models(args, device)
    dino_loss = DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp, 0,
                         args.epochs).to(device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student), device)
    for index, group in enumerate(optimizer.param_groups):
        group["lr"], group["weight_decay"] = 0.05, (0.04 if index == 0 else 0.0)
    # Initial scale 1: the default 65536 (even 256) overflows this untrained head's fp16 gradients (the
    # L2-normalised bottleneck divides them by its small norm), so the scaler would skip the first steps while it
    # calibrates, as in real runs, leaving nothing to compare after one step.
    scaler = torch.amp.GradScaler("cuda", init_scale=1.0) if precision == "fp16" else None
    step = TrainStep(args, student, student, teacher, dino_loss, optimizer, scaler, precision, device)
    return step, student, teacher, args


def crops_for(args, device: torch.device = CUDA, batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * args.local_crops_number
    return [torch.randn(batch, 3, size, size, generator=generator).to(device) for size in sizes]


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


def one_step(precision: str, device: torch.device = CUDA) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, student before, student after, teacher after) of one step; the teacher starts as the student."""
    step, student, teacher, args = make_step(precision, device=device)
    before = flat(student)
    assert torch.equal(flat(teacher), before)
    values = step(crops_for(args, device), epoch=1, momentum=MOMENTUM)
    assert all(math.isfinite(value.item()) for value in values.values())
    return values["loss"].item(), before, flat(student), flat(teacher)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_one_training_step(precision, tf32_off):
    """Finite loss and signals; the student updated and the teacher moved by the EMA of that update. fp32 on the
    GPU against fp32 on the CPU: loss within 1e-4, the student's update (SGD: the clipped gradient) within 1e-3
    (relative L2). bf16/fp16 against GPU fp32: loss within 2%, update cosine > 0.95."""
    loss, before, student, teacher = one_step(precision)
    update = student - before
    # The teacher started as a copy of the student, so the EMA moves it by (1 - m) times the student's update,
    # while rounding alone could move it by about eps * |weights|: demand the former, far above the latter.
    expected = (1 - MOMENTUM) * update
    rounding = torch.finfo(torch.float32).eps * before.norm()
    assert expected.norm() > 100 * rounding, "the step hardly changed the student"
    assert (teacher - before - expected).norm() < 0.01 * expected.norm()

    if precision == "fp32":
        ref_loss, ref_before, ref_student, _ = one_step("fp32", CPU)
        assert torch.equal(ref_before, before)  # the same initial weights on both devices
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        ref_update = ref_student - ref_before
        assert (update - ref_update).norm() < 1e-3 * ref_update.norm()
    else:
        ref_loss, ref_before, ref_student, _ = one_step("fp32")
        assert loss == pytest.approx(ref_loss, rel=0.02)
        assert F.cosine_similarity(update, ref_student - ref_before, dim=0) > 0.95


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


def test_feature_extraction_on_cuda_equals_cpu(tf32_off):
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
    bf16 autocast, cudnn.benchmark, checkpoint written from GPU tensors and loadable on the CPU; log.txt says the
    epoch ran in bf16 with the augmentation on the GPU."""
    from PIL import Image

    from dino_sparo.train import train_dino
    from dino_sparo.utils.files import read_json_lines

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
    (record,) = read_json_lines(tmp_path / "out" / "log.txt")
    assert record["precision"] == "bf16" and record["device"].startswith("cuda")
    assert record["augment_device"].startswith("cuda")
