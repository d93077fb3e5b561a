"""What machine a measurement ran on: CPU, cores, C compiler, shared memory, package versions and, through torch,
its build, the GPU, native bf16 and the float32 math settings. The standard library only at module level: the
functions that need torch import it when called, so that the GPU check can import this module without torch.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows (often only the architecture)."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as cpuinfo:
        return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and schedulers restrict), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def c_compiler() -> str | None:
    """The first line of ``cc --version`` (torch.compile's inductor needs a C compiler on the CPU), None without."""
    if shutil.which("cc") is None:
        return None
    try:
        completed = subprocess.run(["cc", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = completed.stdout.strip().splitlines()
    return lines[0] if completed.returncode == 0 and lines else None


def shared_memory_gib(path: str = "/dev/shm") -> float | None:
    """Size of the shared-memory file system (DataLoader workers hand their batches over through it), None without."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return round(stat.f_blocks * stat.f_frsize / 2**30, 1)


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def host_description() -> dict[str, Any]:
    """What is known without torch: CPU, cores, Python, C compiler, /dev/shm."""
    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "python": platform.python_version(), "c_compiler": c_compiler(), "shm_gib": shared_memory_gib()}


def cpu_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as auto precision decides on a CPU."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def gpu_description(index: int = 0) -> dict[str, Any]:
    """GPU ``index`` and the CUDA stack: name, memory, compute capability, native bf16, CUDA / cuDNN / NCCL."""
    import torch

    properties = torch.cuda.get_device_properties(index)
    nccl = None
    with contextlib.suppress(AttributeError, RuntimeError):
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {"gpu": properties.name, "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
            "compute_capability": f"{properties.major}.{properties.minor}",
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "nccl": nccl}


def float32_math() -> dict[str, Any]:
    """The settings that decide whether float32 matmuls and convolutions run in TF32 (which rounds inputs to
    10 mantissa bits: a comparison of fp32 results needs it off)."""
    import torch

    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def attention_backends(batch: int = 64, heads: int = 6, tokens: int = 197, head_dim: int = 64) -> dict[str, Any]:
    """Which fused attention kernels are enabled, and which one ``scaled_dot_product_attention`` picks on the GPU
    for bf16 inputs of the given shape (default: ViT-S/16 at 224 px, batch 64)."""
    import torch
    from torch.nn.attention import SDPBackend

    backends = torch.backends.cuda
    enabled = {"flash": backends.flash_sdp_enabled(), "mem_efficient": backends.mem_efficient_sdp_enabled(),
               "cudnn": backends.cudnn_sdp_enabled(), "math": backends.math_sdp_enabled()}
    info: dict[str, Any] = {"sdpa_enabled": ", ".join(name for name, on in enabled.items() if on) or "none"}
    if torch.cuda.is_available():
        query = torch.zeros(batch, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16)
        try:  # a private function, but the very one the dispatcher asks
            info["sdpa_chosen_bf16"] = SDPBackend(torch._fused_sdp_choice(query, query, query)).name
        except (AttributeError, RuntimeError, ValueError) as error:
            info["sdpa_chosen_bf16"] = f"unknown ({type(error).__name__})"
    return info


def torch_description() -> dict[str, Any]:
    """torch and the packages around it, the CPU's threads and bf16, and on a CUDA machine the GPU, TF32 and
    attention kernels."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "torchvision": package_version("torchvision"),
                            "timm": package_version("timm"), "triton": package_version("triton"),
                            "threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "cpu_fast_bf16": cpu_fast_bf16(), "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        info.update(gpu_description(), **float32_math(), **attention_backends())
    return info


def describe_machine() -> dict[str, Any]:
    """Everything above in one flat dict (JSON types only)."""
    return {**host_description(), **torch_description()}


def summary_line(info: dict[str, Any] | None = None) -> str:
    """One line for a results file: CPU, cores, torch and threads, Python (and the GPU, if any)."""
    info = info or describe_machine()
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cpu']}, {info['usable_cores']} usable cores of {info['cpu_cores']}{gpu}, torch {info['torch']} "
            f"with {info['threads']} thread(s), Python {info['python']}")
