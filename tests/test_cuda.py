"""CUDA paths, run by ``pytest -m cuda`` (scripts/gpu_check.sh runs them on a GPU) and skipped without one, and the
CPU checks behind them.

fp32 on the GPU is compared with fp32 on the CPU, with TF32 off (which otherwise rounds float32 matmul and
convolution inputs to 10 mantissa bits); each low-precision result with GPU fp32 on the same inputs and weights.
Every tolerance is a multiple of the epsilon of the precision whose rounding it allows for (:data:`TOLERANCE_EPS`),
and the CPU checks below run the same comparisons under CPU autocast over many seeds: rounding alone stays within
half of each tolerance, so a GPU test fails for a bug, not for the rounding of the seed it happens to use.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from dino_sparo.data.device_augment import DeviceAugmentation, StepViews
from dino_sparo.eval.features import extract_features
from dino_sparo.eval.knn import knn_classifier, sharded_knn
from dino_sparo.loss import DINOLoss
from dino_sparo.models import SPARO, vit_tiny
from dino_sparo.models.dinov3 import DINOv3VisionTransformer
from dino_sparo.optim import build_optimizer, get_params_groups
from dino_sparo.train.build import build_models
from dino_sparo.train.config import resolve_precision
from dino_sparo.train.health import NonFiniteWatch
from dino_sparo.train.schedules import build_schedules
from dino_sparo.train.step import AUTOCAST_DTYPES, TrainStep

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
MOMENTUM = 0.99
DTYPES = {"fp32": torch.float32, **AUTOCAST_DTYPES}

# Tolerances in epsilons of the precision compared (fp32: GPU against CPU; bf16/fp16: against fp32 on the same
# device). In brackets the largest error of the same comparison under CPU autocast (fp32: against float64) over
# the seeds of the CPU checks, in the same unit.
TOLERANCE_EPS = {
    "step_loss": 2,  # one training step's loss, relative (0.42)
    "step_update": 16,  # the student's update, relative L2 (5.4)
    # the same in fp32, GPU against CPU: each within its error against float64 (2.7 and 38), so within their sum
    "fp32_step_loss": 64,
    "fp32_step_update": 1024,
    "encoding": 4,  # SPARO's encoding, relative L2 (1.1)
    "attention_sum": 1,  # |sum of an attention row - 1| (0.39; at most half an epsilon if rounded once)
    "gradient": 8,  # each SPARO parameter's gradient, relative L2 (2.4)
    "loss_of_rounded": 16,  # the loss of bf16/fp16 inputs against fp32 on the same rounded inputs (0: it
    # computes in float32, so only the float32 summation order may differ; a loss in bf16 is 80 away)
}


def eps(precision: str) -> float:
    return torch.finfo(DTYPES[precision]).eps


def tolerance(name: str, precision: str) -> float:
    return TOLERANCE_EPS[name] * eps(precision)


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm())


def gpu_test(function):
    """Marked ``cuda`` (selected by the GPU check) and skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(function))


@pytest.fixture
def tf32_off(monkeypatch):
    """float32 matmuls and convolutions on the GPU in full float32, as on the CPU (restored afterwards)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def make_step(precision: str, optimizer: str = "sgd", device: torch.device = CUDA, seed: int = 0,
              arch: str = "vit_tiny", dtype: torch.dtype = torch.float32):
    """A tiny student/teacher step on ``device``, built from ``seed`` whatever the precision and device, with its
    weights in ``dtype`` (float64: the CPU checks' exact reference)."""
    args = tiny_config("unused", "unused", "--device", device.type, "--optimizer", optimizer, "--drop_path_rate", "0",
                       "--freeze_last_layer", "0", "--precision", "fp32", "--arch", arch)
    # fp16 on the CPU (the simulations of the GPU's arithmetic) is refused by the config, so it is set afterwards
    args = dataclasses.replace(args, precision=precision)
    torch.manual_seed(seed)
    student, teacher = (model.to(dtype) for model in build_models(args, device))
    dino_loss = DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp, 0,
                         args.epochs).to(device, dtype)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student), device)
    for index, group in enumerate(optimizer.param_groups):
        group["lr"], group["weight_decay"] = 0.05, (0.04 if index == 0 else 0.0)
    # Initial scale 1: the default 65536 (even 256) overflows this untrained head's fp16 gradients (the
    # L2-normalised bottleneck divides them by its small norm), so the scaler would skip the first steps while it
    # calibrates, as in real runs, leaving nothing to compare after one step. The step is built by hand for the
    # float64 weights of the CPU checks, which the factory does not make.
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0) if precision == "fp16" else None
    step = TrainStep(config=args, student=student, student_module=student, teacher=teacher, dino_loss=dino_loss,
                     optimizer=optimizer, scaler=scaler, device=device)
    return step, student, teacher, args


def crops_for(args, device: torch.device = CUDA, batch: int = 4, seed: int = 1, dtype: torch.dtype = torch.float32
              ) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * args.local_crops_number
    return [torch.randn(batch, 3, size, size, generator=generator).to(device, dtype) for size in sizes]


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in module.parameters()])


def one_step(precision: str, device: torch.device = CUDA, seed: int = 0, dtype: torch.dtype = torch.float32
             ) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, student before, student after, teacher after) of one step; the teacher starts as the student."""
    step, student, teacher, args = make_step(precision, device=device, seed=seed, dtype=dtype)
    before = flat(student)
    assert torch.equal(flat(teacher), before)
    values = step([crops_for(args, device, seed=seed + 1, dtype=dtype)], epoch=1, momentum=MOMENTUM)
    assert all(math.isfinite(value.item()) for value in values.values())
    return values["loss"].item(), before, flat(student), flat(teacher)


def low_precision_step_errors(precision: str, device: torch.device, seed: int = 0) -> dict[str, float]:
    """One step in ``precision`` against one in fp32 on the same device, weights and crops, in epsilons of
    ``precision``: the loss (relative) and the student's update (relative L2)."""
    reference_loss, reference_before, reference_after, _ = one_step("fp32", device, seed)
    loss, before, after, _ = one_step(precision, device, seed)
    return {"step_loss": abs(loss - reference_loss) / abs(reference_loss) / eps(precision),
            "step_update": relative(after - before, reference_after - reference_before) / eps(precision)}


@gpu_test
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_one_training_step(precision, tf32_off):
    """Finite loss and signals; the student updated and the teacher moved by the EMA of that update. fp32 on the
    GPU against fp32 on the CPU, bf16/fp16 against GPU fp32: the loss and the update within :data:`TOLERANCE_EPS`."""
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
        assert loss == pytest.approx(ref_loss, rel=tolerance("fp32_step_loss", "fp32"))
        assert relative(update, ref_student - ref_before) < tolerance("fp32_step_update", "fp32")
    else:
        errors = low_precision_step_errors(precision, CUDA)
        assert all(errors[name] < TOLERANCE_EPS[name] for name in errors), errors


def sparo_autocast_errors(precision: str, device: torch.device, seed: int = 0) -> dict[str, float]:
    """SPARO's forward and backward under autocast against fp32, in epsilons of ``precision``: the encoding
    (relative L2), the attention rows' sums, the worst parameter gradient (relative L2)."""
    torch.manual_seed(seed)
    sparo = SPARO(embed_dim=192, num_slots=16, slot_dim=32, attn_dim=64).to(device)
    tokens = torch.randn(8, 50, 192, device=device)
    target = torch.randn(8, 16 * 32, device=device)  # a fixed direction: the unit-norm encoding's norm is constant
    reference = sparo(tokens)
    (reference * target).sum().backward()
    reference_grads = {name: p.grad.clone() for name, p in sparo.named_parameters()}
    sparo.zero_grad()
    with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]):
        encoding, attention = sparo(tokens, return_attention=True)
    (encoding.float() * target).sum().backward()
    return {"encoding": relative(encoding.float(), reference) / eps(precision),
            "attention_sum": float((attention.detach().float().sum(-1) - 1).abs().max()) / eps(precision),
            "gradient": max(relative(p.grad.float(), reference_grads[name]) for name, p in sparo.named_parameters())
            / eps(precision)}


@gpu_test
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sparo_forward_and_backward_under_autocast(precision):
    errors = sparo_autocast_errors(precision, CUDA)
    assert all(errors[name] < TOLERANCE_EPS[name] for name in errors), errors


def loss_of_rounded_inputs_errors(precision: str, device: torch.device, seed: int = 0) -> dict[str, float]:
    """The loss and centre of ``precision`` outputs under autocast against fp32 on the same values (the outputs
    rounded to ``precision``, then back to float32), in float32 epsilons: the loss computes in float32, so what
    rounding the outputs does is no part of the comparison."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(4 * 6, 256, generator=generator).to(device, DTYPES[precision])
    teacher = torch.randn(2 * 6, 256, generator=generator).to(device, DTYPES[precision])
    reference_loss = DINOLoss(256, 4, 0.04, 0.04, 0, 10).to(device)
    expected = reference_loss(student.float(), teacher.float(), 0)
    loss = DINOLoss(256, 4, 0.04, 0.04, 0, 10).to(device)
    with torch.autocast(device.type, dtype=DTYPES[precision]):
        value = loss(student, teacher, 0)
    assert value.dtype == torch.float32 and loss.center.dtype == torch.float32
    return {"loss": abs(value.item() - expected.item()) / abs(expected.item()) / eps("fp32"),
            "centre": relative(loss.center, reference_loss.center) / eps("fp32")}


@gpu_test
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_dino_loss_and_centre_under_autocast(precision):
    """The loss computes in float32 whatever autocast hands it: equal to fp32's on the same rounded outputs."""
    errors = loss_of_rounded_inputs_errors(precision, CUDA)
    assert max(errors.values()) < TOLERANCE_EPS["loss_of_rounded"], errors


@gpu_test
def test_feature_extraction_on_cuda_equals_cpu(tf32_off):
    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, depth=3, readout="sparo", sparo_slots=4, sparo_slot_dim=8).eval()
    batches = [(torch.randn(5, 3, 32, 32), torch.arange(5)) for _ in range(3)]
    on_cpu, labels_cpu = extract_features(model, batches, "cpu")
    on_cuda, labels_cuda = extract_features(model.to(CUDA), batches, CUDA)
    assert on_cuda.device.type == "cpu" and torch.equal(labels_cpu, labels_cuda)
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-4, rtol=1e-3)


@gpu_test
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


@gpu_test
@pytest.mark.parametrize("arch", ["vit_tiny", "dinov3_vits16"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_iterations_never_wait_for_the_gpu(precision, arch):
    """Between logging intervals nothing reads the device back: device-side augmentation of pinned uint8
    crops, schedules, the step (AdamW fused, GradScaler for fp16; DINOv3's RoPE tables), the non-finite watch.
    Any host synchronisation in them raises under set_sync_debug_mode("error")."""
    step, _, _, args = make_step(precision, optimizer="adamw", arch=arch)
    views = StepViews(DeviceAugmentation(args.local_crops_number, args.global_crop_size), CUDA, CUDA, 0, 0)
    schedules = build_schedules(args, niter_per_epoch=8, world_size=1)
    watch = NonFiniteWatch(8, CUDA)
    generator = torch.Generator().manual_seed(0)
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * args.local_crops_number
    batch = [torch.randint(0, 256, (4, 3, s, s), dtype=torch.uint8, generator=generator).pin_memory() for s in sizes]

    def iteration(index: int) -> None:
        schedules.apply(step.optimizer, index)
        values = step([views(batch, index)], epoch=1, momentum=float(schedules.momentum[index]))
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


@gpu_test
def test_auto_precision_on_this_gpu_and_on_one_without_native_bf16(monkeypatch):
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert resolve_precision("auto", None, CUDA) == ("bf16" if native else "fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", None, CUDA) == "fp16"  # a V100 or T4: bf16 only emulated


@gpu_test
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
    result = train_dino(tiny_config(data, tmp_path / "out", "--device", "cuda", "--precision", "bf16", "--epochs", "1",
                                  "--num_workers", "2"))
    assert torch.backends.cudnn.benchmark
    assert next(result.teacher.parameters()).device.type == "cuda"
    assert math.isfinite(result.epoch_stats[0]["train_loss"])
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and all(t.device.type == "cpu" for t in checkpoint["teacher"].values())
    (record,) = read_json_lines(tmp_path / "out" / "log.txt")
    assert record["precision"] == "bf16" and record["device"].startswith("cuda")
    assert record["augment_device"].startswith("cuda")


# ------------------------------------------------------------------------------------------------ CPU checks
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_rounding_alone_stays_within_half_of_each_low_precision_tolerance(precision):
    """The GPU tests' comparisons under CPU autocast, over many seeds: rounding to ``precision`` never uses more
    than half of a tolerance, so the GPU tests (one seed each) have room for their kernels' own rounding."""
    worst: dict[str, float] = {}
    for seed in range(6):
        for name, value in low_precision_step_errors(precision, CPU, seed).items():
            worst[name] = max(worst.get(name, 0.0), value)
    for seed in range(40):
        for name, value in sparo_autocast_errors(precision, CPU, seed).items():
            worst[name] = max(worst.get(name, 0.0), value)
    for name, value in worst.items():
        assert value <= TOLERANCE_EPS[name] / 2, (name, value)


def test_float32_rounding_stays_within_a_quarter_of_the_gpu_against_cpu_tolerances():
    """fp32 on the CPU against float64: the GPU's fp32 differs from the CPU's by at most both errors against the
    exact result, so each within a quarter of the tolerance leaves half of it for the GPU's kernels."""
    for seed in range(4):
        exact_loss, exact_before, exact_after, _ = one_step("fp32", CPU, seed, dtype=torch.float64)
        loss, before, after, _ = one_step("fp32", CPU, seed)
        assert abs(loss - exact_loss) / abs(exact_loss) <= tolerance("fp32_step_loss", "fp32") / 4
        assert relative(after - before, exact_after - exact_before) <= tolerance("fp32_step_update", "fp32") / 4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_loss_tolerance_passes_float32_arithmetic_and_fails_a_loss_in_low_precision(precision):
    """Against fp32 on the rounded outputs the float32 loss is exact on the CPU for every seed, while the old
    comparison with the unrounded outputs (1e-3 relative) failed for about a third of the bf16 seeds. A loss
    computed in ``precision`` instead is far outside the tolerance."""
    for seed in range(50):
        assert max(loss_of_rounded_inputs_errors(precision, CPU, seed).values()) <= \
            TOLERANCE_EPS["loss_of_rounded"] / 2
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4 * 6, 256, generator=generator).to(DTYPES[precision])
    teacher = torch.randn(2 * 6, 256, generator=generator).to(DTYPES[precision])
    expected = DINOLoss(256, 4, 0.04, 0.04, 0, 10)(student.float(), teacher.float(), 0)
    teacher_probs = F.softmax(teacher / 0.04, dim=-1).view(2, -1, 256)  # all in the low precision: the bug
    student_logs = F.log_softmax(student / 0.1, dim=-1).view(4, -1, 256)
    others = student_logs.sum(dim=0, keepdim=True) - student_logs[:2]
    wrong = -(teacher_probs * others).sum(dim=-1).mean(dim=1).sum() / 6
    assert abs(wrong.item() - expected.item()) / expected.item() > 4 * tolerance("loss_of_rounded", "fp32")


def test_dinov3_builds_its_rope_table_once_per_grid_and_it_equals_timms():
    """timm's table, built on the CPU and copied to the device (a host synchronisation) on every call, is built
    once per grid, device and dtype; a model in training with coordinate augmentation gets a fresh one each time."""
    model = DINOv3VisionTransformer(embed_dim=64, depth=2, num_heads=2, sparo_slots=4, sparo_slot_dim=8)
    built = []
    get_embed = model.rope.get_embed
    model.rope.get_embed = lambda shape=None, dtype=None: built.append(tuple(shape)) or get_embed(shape, dtype)
    for size in (32, 16, 32, 16):
        model(torch.randn(2, 3, size, size))
    model.forward_from(model.frozen_tokens(torch.randn(1, 3, 48, 48), 1), 1)  # a grid from the token count
    assert built == [(2, 2), (1, 1), (3, 3)]
    for grid in ((2, 2), (3, 3), (2, 5)):
        torch.testing.assert_close(model.rope_table(grid), get_embed(list(grid)), rtol=0, atol=0)
    assert built[3:] == [(2, 5)]
    model.double()  # another dtype of timm's periods: another table
    assert model.rope_table((2, 2)).dtype == torch.float64 and built[4:] == [(2, 2)]

    model.rope.aug_active = True  # as configured with shift/jitter/rescale coordinates
    model.rope_table((2, 2)), model.rope_table((2, 2))
    assert built[5:] == [(2, 2), (2, 2)]
    model.eval()
    model.rope_table((2, 2))
    assert len(built) == 7  # in evaluation timm draws no augmentation: the cached table again
