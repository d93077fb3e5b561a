"""Part 1, environment: the machine as torch sees it, from :mod:`gpu_check.probe` (never from this process)."""
from __future__ import annotations

import json
from typing import Any

from .report import Part
from .supervisor import Check


def headline(info: dict[str, Any]) -> str:
    cores = f"{info['usable_cores']} usable of {info['cpu_cores']} CPU cores"
    compiler = f"cc: {info['c_compiler'] or 'none'}; triton {info['triton'] or 'not installed'}"
    if not info["cuda_available"]:
        return f"no GPU: {info['cpu']}, {cores}; torch {info['torch']}; {compiler}"
    tf32 = "on" if info["matmul_allow_tf32"] or info["cudnn_allow_tf32"] else "off"
    return (f"{info['gpu']} ({info['gpu_memory_gib']} GiB, sm {info['compute_capability']}), bf16 native: "
            f"{'yes' if info['bf16_native'] else 'no'}; torch {info['torch']}, CUDA {info['cuda']}, cuDNN "
            f"{info['cudnn']}, NCCL {info['nccl']}; {compiler}; TF32 {tf32} (matmul precision "
            f"{info['float32_matmul_precision']}); SDPA bf16: {info['sdpa_chosen_bf16']}; {cores}; "
            f"/dev/shm {info['shm_gib']} GiB")


def check_environment(check: Check, part: Part) -> None:
    step = check.step(part, "environment", check.module_command("probe", "machine"), check.limit(part, "environment"))
    if not part.succeeded(step, "the environment probe (importing torch, querying the device)"):
        return
    info = json.loads(step.output.strip().splitlines()[-1])
    part.figures.update(info)
    part.headline = headline(info)
    if info["c_compiler"] is None:
        part.notes.append("no C compiler (cc): torch.compile cannot build its kernels on the CPU side")
    if not check.dry_run:
        part.expect(info["cuda_available"], "torch sees no CUDA device in the check's commands")
