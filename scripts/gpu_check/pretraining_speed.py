"""Part 4, pretraining speed: main_dino.py itself (data loading, augmentation on the device, step, EMA, logging)
at ImageNet scale, ViT-S/16 with 2x224 + 8x96 crops, batch 64 and out_dim 65536, on generated 500x375 JPEGs,
until a SIGTERM after the plan's time: its images/s and the share of each epoch spent waiting for the loader, from
log.txt, read first whatever the exit (a SIGTERM after the training loop ends the process, its epochs logged)."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .report import Part
from .supervisor import Check, Watch
from .training_log import NOT_RECORDED, TrainingLog, describe_setup, setup_problem

EXIT_PREEMPTED = 3  # main_dino.py's status after a SIGTERM: state saved, stopped between two iterations


def stop_after(seconds: float) -> Watch:
    """SIGTERM to the run once ``seconds`` have passed since the first look, so that it stops (saving its
    state) with the epochs it completed logged."""
    state = {"start": None, "sent": False}

    def watch(process: subprocess.Popen, log_path: Path) -> bool:
        state["start"] = state["start"] or time.monotonic()
        if not state["sent"] and time.monotonic() - state["start"] > seconds and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            state["sent"] = True
        return False

    return watch


def percent(share: float | None) -> str:
    return f"{100 * share:.1f}%" if share is not None else NOT_RECORDED


def check_pretraining_speed(check: Check, part: Part) -> None:
    run = check.plan.speed_run
    photos = check.work_dir / "photos"
    generated = check.step(part, "photos", check.module_command("images", "photos", photos, run.distinct_photos,
                                                                run.images), check.limit(part, "photos"))
    if not part.succeeded(generated, "generating the JPEGs"):
        return
    output_dir = check.work_dir / "runs" / "pretraining_speed"
    command = [check.python, "main_dino.py", "--data_path", photos, "--output_dir", output_dir, *run.flags,
               "--epochs", str(run.epochs)]
    training = check.step(part, "main_dino", command, check.limit(part, "main_dino"),
                          watch=stop_after(run.stop_after_s), ok_returncodes=(0, EXIT_PREEMPTED))
    if training.returncode == EXIT_PREEMPTED:
        part.notes.append(f"stopped by SIGTERM after {run.stop_after_s:.0f} s, as planned, with the epochs it "
                          f"completed logged")
    log = TrainingLog.read(output_dir)  # first: what a run ended by a signal did is there
    if training.returncode == -signal.SIGTERM:
        # Ended by the signal itself rather than stopping on it: outside the training loop, which handles it.
        if not log.records:
            part.problems.append(f"no epoch within {run.stop_after_s:.0f} s: the SIGTERM then ended main_dino.py "
                                 f"before its training loop began")
            return
        if not part.expect(len(log.records) >= run.epochs, f"the SIGTERM ended main_dino.py after "
                           f"{len(log.records)} of {run.epochs} epochs without its preemption stop (exit 3)"):
            return
        part.notes.append(f"all {run.epochs} epochs ran within {run.stop_after_s:.0f} s: the SIGTERM came after the "
                          f"training loop had ended and stopped what follows it")
    elif training.status in ("timeout", "skipped") or not part.succeeded(training, "main_dino.py"):
        return
    if not part.expect(bool(log.records), f"no epoch completed within {run.stop_after_s:.0f} s"):
        return
    problem = setup_problem(log, None, check.plan.device)
    part.expect(problem is None, str(problem))
    augment_device = log.fact("augment_device")
    # auto: the batched colour/blur/solarisation ops on the training device, as on ImageNet runs
    part.expect(augment_device is None or str(augment_device).startswith(check.plan.device),
                f"augmentation ran on {augment_device}, not on the training device ({check.plan.device})")
    first, later = log.records[0], log.median("images_per_s", skip_first=True)
    steady = len(log.records) > 1
    part.figures.update({
        "epochs completed": len(log.records),
        "images per epoch": run.images,
        "precision and device": describe_setup(log),
        "augmentation device": augment_device or NOT_RECORDED,
        "DataLoader workers": run.flags[run.flags.index("--num_workers") + 1],
        "first epoch: images/s": round(first["images_per_s"], 1),
        "first epoch: data-wait share": percent(first.get("data_wait_share")),
    })
    if steady:
        part.figures["later epochs: images/s (median)"] = round(later, 1)
        part.figures["later epochs: data-wait share (median)"] = percent(log.median("data_wait_share", True))
    else:
        part.notes.append("one epoch only: its figures include the warm-up (worker start, cuDNN autotuning)")
    rate = later if steady else first["images_per_s"]
    wait = log.median("data_wait_share", skip_first=steady)
    part.headline = (f"{rate:.0f} img/s ({'epochs after the first' if steady else 'first epoch'}), waiting for "
                     f"data {percent(wait)} of the time; {describe_setup(log)}, augmentation on "
                     f"{augment_device or NOT_RECORDED}")
