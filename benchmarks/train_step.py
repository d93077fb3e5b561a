"""Training-step throughput and peak memory, the fast path (``dino_sparo.train.step.TrainStep``) against the
reference-style step (:mod:`benchmarks.reference_step`: fp16 with a GradScaler on a GPU, fp32 on a CPU, as the
reference trains by default).

Speed: all steps of one architecture (read-outs, baseline and fast) are built in one subprocess and timed
alternately, step by step, keeping each one's best step, so that load from other processes hits them alike.
Memory: each configuration runs alone in a fresh subprocess (``python -m benchmarks.train_step memory
CONFIG_JSON``) and reports its peak resident set size (``getrusage`` max RSS of the whole process:
interpreter, torch, both models, optimizer state, activations) on CPU, ``torch.cuda.max_memory_allocated``
on a GPU.

With a GradScaler (fp16), the warm-up goes on until a step leaves the scale unchanged: its initial scale of 65536
overflows fp16 gradients at first, and each overflow skips the optimizer step and halves the scale, so steps timed
before it settles would be steps without an update. Steps skipped while timing are counted in the row.

A subprocess's output reaches this process's output line by line as it is written (one line per build, warm-up
step and timed step), so a subprocess killed midway has shown how far it got; a compiling one also logs its
recompilations (``TORCH_LOGS=recompiles``).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from dino_sparo.distributed import resolve_device

from .common import best_time
from .processes import stream_output
from .profile import device_peak_flops, profile_by_category, step_flops

MAX_SCALER_WARMUP_STEPS = 24  # the GradScaler's 65536 halves to below 1 in 17 skipped steps
RESULT_PREFIX = "result: "  # the subprocess's last line: its result as JSON
say = partial(print, flush=True)


def _train_config(config: dict[str, Any]):
    """main_dino.py's config of a benchmark row (the baseline keeps the fast path's models, in the reference's
    precision)."""
    from dino_sparo.train.config import parse_config

    from .reference_step import reference_precision

    baseline = config["mode"] == "baseline"
    precision = reference_precision(resolve_device(config["device"])) if baseline else config["precision"]
    return parse_config([
        "--data_path", "unused", "--arch", config["arch"], "--readout", config["readout"],
        "--out_dim", str(config["out_dim"]), "--batch_size_per_gpu", str(config["batch_size"]),
        "--local_crops_number", str(config["local_crops"]), "--global_crop_size", str(config["global_crop_size"]),
        "--local_crop_size", str(config["local_crop_size"]), "--precision", precision, "--device", config["device"],
        "--compile", str(bool(config["compile"]) and not baseline),
        *(["--depth", str(config["depth"])] if config.get("depth") else []),
        *(["--freeze_blocks", str(config["freeze_blocks"])] if config["mode"] == "retrofit" else []),
    ])


def build_step(config: dict[str, Any]) -> tuple[Callable[[], Any], str, torch.device, torch.amp.GradScaler | None]:
    """Student, teacher, loss, optimizer and inputs for ``config`` (through main_dino.py's factory); returns a
    callable running one step, its precision and device, and its GradScaler (fp16) or None."""
    from dino_sparo.distributed import DistributedContext
    from dino_sparo.optim import get_params_groups
    from dino_sparo.train.build import build_training
    from dino_sparo.train.schedules import build_schedules

    from .reference_step import ReferenceStep

    torch.manual_seed(0)
    train_config = _train_config(config)
    device = resolve_device(config["device"])
    step = build_training(train_config, DistributedContext(device=device))
    if config["mode"] == "baseline":
        groups = get_params_groups(step.student_module, train_config.model.readout_options)
        step = ReferenceStep(step.student_module, step.teacher, step.dino_loss, groups, train_config.clip_grad,
                             train_config.freeze_last_layer, train_config.precision, device)
    # The schedules of a real run at its first iteration after warm-up: the peak learning rate.
    schedules = build_schedules(train_config, niter_per_epoch=1, world_size=1)
    schedules.apply(step.optimizer, min(train_config.warmup_epochs, train_config.epochs - 1))

    batch = train_config.batch_size_per_gpu
    crops = [torch.randn(batch, 3, train_config.global_crop_size, train_config.global_crop_size, device=device)
             for _ in range(2)]
    crops += [torch.randn(batch, 3, train_config.local_crop_size, train_config.local_crop_size, device=device)
              for _ in range(train_config.local_crops_number)]
    # Epoch past freeze_last_layer, so the head's last layer is trained as in most of a run.
    epoch = train_config.freeze_last_layer
    if config["mode"] == "baseline":
        return (lambda: step(crops, epoch, 0.996)), train_config.precision, device, step.scaler
    return (lambda: step([crops], epoch, 0.996)), train_config.precision, device, step.scaler


def warm_up(step: Callable[[], Any], scaler: torch.amp.GradScaler | None, steps: int, label: str) -> int:
    """``steps`` untimed steps, then, with a GradScaler, more until one leaves its scale unchanged (at most
    :data:`MAX_SCALER_WARMUP_STEPS`); one line each. Returns how many ran."""
    run = 0
    while run < steps or (scaler is not None and run < steps + MAX_SCALER_WARMUP_STEPS):
        scale = scaler.get_scale() if scaler is not None else None
        seconds, _ = best_time(step, repeats=1, warmup=0)
        run += 1
        settled = scaler is None or scaler.get_scale() == scale
        say(f"  {label}: warm-up step {run}: {seconds:.4f} s" + (f", GradScaler scale {scale:g} -> "
                                                              f"{scaler.get_scale():g}" if scaler else ""))
        if run >= steps and settled:
            break
    return run


def skipped_steps(scale_before: float, scale_after: float) -> int:
    """Optimizer steps a GradScaler skipped between two readings of its scale: each halved it (it grows only
    after 2000 steps without an overflow, far more than a benchmark runs)."""
    return round(math.log2(scale_before / scale_after)) if scale_after < scale_before else 0


def measure_memory(config: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one configuration alone in this (fresh) process: build, warm-up, then 1 step."""
    step, precision, device, scaler = build_step(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_up(step, scaler, config["warmup"], _label(config))
    best_time(step, repeats=1, warmup=0)
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "memory": "max_memory_allocated"}
    # Linux reports KiB.
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "memory": "max_rss"}


def measure_speed(configs: list[dict[str, Any]], steps: int, warmup: int) -> list[dict[str, Any]]:
    """Builds every configuration in this process and times their steps interleaved (one step of each in
    turn, ``steps`` times), so load from other processes hits all of them alike; keeps each one's best.

    On a GPU each configuration's peak memory is measured here too, as the peak allocated while it was built
    and warmed up above what was allocated before (the allocator counts exactly, whatever else is resident),
    which spares a fresh process, and a second torch.compile, per configuration.
    """
    built, peaks, warmups = [], [], []
    for config in configs:
        cuda = resolve_device(config["device"]).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        built.append(build_step(config))
        say(f"  {_label(config)}: built in {time.perf_counter() - start:.1f} s")
        warmups.append(warm_up(built[-1][0], built[-1][3], max(warmup, 1 if cuda else 0), _label(config)))
        if cuda:
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
    best = [float("inf")] * len(configs)
    scales_before = [scaler.get_scale() if scaler else None for *_, scaler in built]
    for round_ in range(steps):
        for index, (config, (step, *_)) in enumerate(zip(configs, built)):
            seconds, _ = best_time(step, repeats=1, warmup=0)
            best[index] = min(best[index], seconds)
            say(f"  {_label(config)}: timed step {round_ + 1}: {seconds:.4f} s")
    rows = [{"seconds_per_step": seconds, "images_per_s": config["batch_size"] / seconds, "precision": precision,
             "device": str(device), "warmup_steps": warmed,
             "skipped_steps": skipped_steps(before, scaler.get_scale()) if scaler else 0}
            for seconds, config, (_, precision, device, scaler), warmed, before
            in zip(best, configs, built, warmups, scales_before)]
    for row, peak in zip(rows, peaks):
        row["peak_mib"], row["memory"] = peak, "max_memory_allocated (in process)"
    for row, config, (step, _, device, _) in zip(rows, configs, built):
        add_utilisation(row, step, config["batch_size"], device)
        if config.get("profile"):
            row["profile_ms"] = profile_by_category(step, device)
    return rows


def add_utilisation(row: dict[str, Any], step: Callable[[], Any], batch_size: int, device: torch.device) -> None:
    """FLOPs per image of the step (counted, not estimated) and, on a GPU, model FLOPs utilisation: FLOPs per
    image x images/s over the device's dense bf16 peak."""
    flops_per_image = step_flops(step) / batch_size
    row["gflop_per_image"] = flops_per_image / 1e9
    if device.type == "cuda":
        peak, source = device_peak_flops(device)
        row["mfu"] = flops_per_image * row["images_per_s"] / peak
        row["peak_source"] = source


UTILISATION_KEYS = ("gflop_per_image", "mfu", "peak_source", "profile_ms")
SUBPROCESS_TIMEOUT_S = 3600  # a hung step must not hang the benchmark forever


def run_in_subprocess(command: list[str], log: Callable[[str], None], compiles: bool = False,
                      timeout: float = SUBPROCESS_TIMEOUT_S) -> Any:
    """The result a benchmark subprocess prints last (after :data:`RESULT_PREFIX`); every other line of its
    output goes to ``log`` as it comes. ``compiles``: its torch.compile recompilations are logged too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if compiles:
        env.setdefault("TORCH_LOGS", "recompiles")

    def on_line(line: str) -> None:
        if not line.startswith(RESULT_PREFIX):
            log(line)

    returncode, lines = stream_output(command, timeout, on_line, env=env)
    results = [line.removeprefix(RESULT_PREFIX) for line in lines if line.startswith(RESULT_PREFIX)]
    if returncode != 0 or not results:
        status = f"killed after {timeout:.0f} s" if returncode is None else f"exit status {returncode}"
        raise RuntimeError(f"the benchmark subprocess failed ({status}); its output is above")
    return json.loads(results[-1])


def _run_task(task: str, payload: Any, log: Callable[[str], None], compiles: bool) -> Any:
    """``python -m benchmarks.train_step TASK PAYLOAD_JSON`` in a fresh process; its result."""
    log(f"  [{task} subprocess]")
    return run_in_subprocess([sys.executable, "-m", "benchmarks.train_step", task, json.dumps(payload)], log,
                             compiles)


def bench_train(configs: list[dict[str, Any]], steps: int, warmup: int, log: Callable[[str], None] = say
                ) -> list[dict[str, Any]]:
    """Rows with images/s and peak memory for every configuration, plus each fast row's ratios to the
    baseline row of the same architecture and read-out.

    Speed: the configurations of one architecture share a process and are timed interleaved.
    Memory: on a GPU, measured in that process (see :func:`measure_speed`); on a CPU, where only the whole
    process's peak RSS is known, each configuration runs alone in a fresh process.
    """
    rows = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for config in configs:
        groups.setdefault(config["arch"], []).append(config)
    for group in groups.values():
        compiles = any(config["compile"] for config in group)
        speeds = _run_task("speed", {"configs": group, "steps": steps, "warmup": warmup}, log, compiles)
        for config, speed in zip(group, speeds):
            memory = speed if "peak_mib" in speed else _run_task("memory", config, log, config["compile"])
            log(f"  {_label(config)}: {speed['images_per_s']:.3g} images/s, peak {memory['peak_mib']:.0f} MiB")
            rows.append({"bench": "train_step", "config": _shape(config), "arch": config["arch"],
                         "readout": config["readout"], "mode": config["mode"], "precision": speed["precision"],
                         "compile": config["compile"], "device": speed["device"],
                         "seconds": speed["seconds_per_step"], "images_per_s": speed["images_per_s"],
                         "peak_mib": memory["peak_mib"], "memory": memory["memory"],
                         "warmup_steps": speed["warmup_steps"], "skipped_steps": speed["skipped_steps"],
                         **{key: speed[key] for key in UTILISATION_KEYS if key in speed}})
    for row in rows:
        # fast rows against the reference-style baseline; retrofit rows against the full fast step they shorten
        reference_mode = {"fast": "baseline", "retrofit": "fast"}.get(row["mode"])
        base = next((r for r in rows if r["mode"] == reference_mode and r["arch"] == row["arch"]
                     and r["readout"] == row["readout"]
                     and (reference_mode == "baseline" or (r["precision"], r["compile"]) ==
                          (row["precision"], row["compile"]))), None)
        if base is not None:
            row["speedup"] = base["seconds"] / row["seconds"]
            row["memory_ratio"] = row["peak_mib"] / base["peak_mib"]
    return rows


def _shape(config: dict[str, Any]) -> str:
    return (f"b{config['batch_size']} 2x{config['global_crop_size']}+{config['local_crops']}x"
            f"{config['local_crop_size']} K={config['out_dim']}")


def _label(config: dict[str, Any]) -> str:
    extra = (" compile" if config["compile"] else "") + (f" frozen {config['freeze_blocks']}"
                                                          if config["mode"] == "retrofit" else "")
    return f"{config['arch']}/{config['readout']} {config['mode']} {config['precision']}{extra}"


if __name__ == "__main__":
    task, payload = sys.argv[1], json.loads(sys.argv[2])
    if task == "speed":
        result = measure_speed(payload["configs"], payload["steps"], payload["warmup"])
    else:
        result = measure_memory(payload)
    say(RESULT_PREFIX + json.dumps(result))
