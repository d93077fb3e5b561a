"""Where a training step's time goes, and how much of the device it uses.

- :func:`step_flops`: FLOPs of one step counted by ``torch.utils.flop_counter`` (student forward and backward over
  every crop, teacher forward over the global crops, the head), as model-FLOPs utilisation counts them.
- :func:`device_peak_flops`: the device's dense bf16 peak, from a table of known GPUs, else a bf16 matmul measured
  here (and on a CPU always measured).
- :func:`profile_by_category`: a ``torch.profiler`` run of the step, its self time per step by category: matmul,
  attention, elementwise/norm (the forward and backward ops), loss, optimizer, EMA/clipping (the scopes
  :class:`dino_sparo.train.step.TrainStep` marks), other.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets, by a substring of the name.
KNOWN_PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
               ("L4", 121e12), ("A10", 125e12), ("V100", 125e12), ("T4", 65e12))
SCOPE_CATEGORIES = {"dino_sparo:loss": "loss", "dino_sparo:optimizer": "optimizer", "dino_sparo:clip": "EMA/clipping",
                    "dino_sparo:ema": "EMA/clipping"}
OP_CATEGORIES = (("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "_softmax")),
                 ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "gemm")),
                 ("elementwise/norm", ("norm", "gelu", "aten::add", "aten::mul", "aten::div", "aten::sub", "copy_",
                                       "aten::cat", "aten::where", "aten::pow", "aten::exp", "dropout", "aten::to",
                                       "aten::sum", "aten::mean", "fill_", "clone", "threshold")))
CATEGORIES = ("matmul", "attention", "elementwise/norm", "loss", "optimizer", "EMA/clipping", "other")


def step_flops(step: Callable[[], Any]) -> float:
    """FLOPs of one call of ``step`` (matmuls and convolutions, forward and backward), by FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(dense bf16 FLOP/s, where the figure comes from) for ``device``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for marker, peak in KNOWN_PEAKS:
            if marker in name:
                return peak, f"{name} data sheet"
    return measured_matmul_peak(device), "bf16 matmul measured in this run"


def measured_matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) bf16 matmul on ``device``."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def _category(event: Any) -> str:
    scope = event
    while scope is not None:
        if scope.name in SCOPE_CATEGORIES:
            return SCOPE_CATEGORIES[scope.name]
        if scope.name.startswith("Optimizer."):
            return "optimizer"
        scope = scope.cpu_parent
    for category, markers in OP_CATEGORIES:
        if any(marker in event.name for marker in markers):
            return category
    return "other"


def profile_by_category(step: Callable[[], Any], device: torch.device, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step of each of :data:`CATEGORIES` (self time of every op: device time on a GPU, CPU time
    on a CPU), over ``steps`` profiled steps after one warm-up step."""
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in profiler.events():
        if event.name.startswith(("dino_sparo:", "Optimizer.", "ProfilerStep")):
            continue  # scopes: their time is their ops' time
        microseconds = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[_category(event)] += microseconds
    return {category: total / 1000 / steps for category, total in totals.items()}
