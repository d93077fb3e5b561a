"""Part 3, end to end: torchrun pretraining of a small model stopped by SIGTERM mid-epoch and resumed, a second
precision straight through, then k-NN, linear probe and attention maps of the checkpoint. Training figures come
from log.txt (:mod:`gpu_check.training_log`), where the run stopped from the checkpoint itself."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .plan import EVAL_SIZE_FLAGS, IMAGE_SIDE, PRETRAIN_FLAGS
from .report import Part
from .supervisor import Check, signal_once_logged
from .training_log import NOT_RECORDED, TrainingLog, describe_setup, setup_problem

# torchrun's workers log NCCL's warnings (set up, transport, timeouts), not its chatter.
TORCHRUN_ENV = {"NCCL_DEBUG": "WARN"}
PRETRAIN_EPOCHS = int(PRETRAIN_FLAGS[PRETRAIN_FLAGS.index("--epochs") + 1])
LOADER_KILLED = re.compile(r"DataLoader worker \(pid \d+\) is killed by signal")
LOADER_ADVICE = ("the DataLoader worker processes died of the SIGTERM (torchrun signals each worker's whole process "
                 "group): they must ignore the preemption signals")


def pretrain_command(check: Check, data: Path, output_dir: Path, precision: str) -> list[str]:
    return [check.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "main_dino.py",
            "--data_path", str(data), "--output_dir", str(output_dir), *PRETRAIN_FLAGS, "--precision", precision,
            "--device", check.plan.device, "--num_workers", str(check.plan.workers)]


def record_training(check: Check, part: Part, output_dir: Path, precision: str, label: str) -> None:
    """Images/s, memory, precision and device of the run(s) in ``output_dir``, from its log.txt; a problem unless
    every epoch was logged once and it ran in ``precision`` on the device."""
    log = TrainingLog.read(output_dir)
    part.expect(sorted(log.epochs) == list(range(PRETRAIN_EPOCHS)),
                f"{label}: log.txt holds epochs {log.epochs}, expected each of 0-{PRETRAIN_EPOCHS - 1} once")
    problem = setup_problem(log, precision, check.plan.device)
    part.expect(problem is None, f"{label}: {problem}")
    part.figures[f"{label}: precision and device"] = describe_setup(log)
    rate = log.median("images_per_s")
    part.figures[f"{label}: images/s (median)"] = round(rate, 1) if rate is not None else NOT_RECORDED
    if not check.dry_run:  # measured on CUDA only
        memory = log.median("max_memory_mb")
        part.figures[f"{label}: max mem MB"] = round(memory) if memory is not None else NOT_RECORDED


def checkpoint_position(check: Check, part: Part, checkpoint: Path, label: str) -> tuple[int, int] | None:
    """(epoch, iteration) the checkpoint resumes at, read by a probe with torch; None when it cannot be read."""
    if not checkpoint.exists():
        part.problems.append(f"{label}: no checkpoint was written")
        return None
    probe = check.step(part, "checkpoint", check.module_command("probe", "checkpoint", checkpoint),
                       check.limit(part, "checkpoint"))
    if not part.succeeded(probe, f"{label}: reading the checkpoint"):
        return None
    position = json.loads(probe.output.strip().splitlines()[-1])
    return position["epoch"], position["iteration"]


def pretrain_preempted_and_resumed(check: Check, part: Part, command: list[str], output_dir: Path,
                                   precision: str, label: str) -> None:
    """The run is sent SIGTERM once it has printed an iteration's progress; it must save its state mid-epoch and
    stop, and the same command must then resume it where it stopped and finish."""
    # torchrun itself exits non-zero when it is signalled, whatever its worker did: the checkpoint tells.
    stopped = check.step(part, f"pretrain_{precision}_preempted", command, check.limit(part, "pretrain"),
                         watch=signal_once_logged("img/s:"), ok_returncodes=range(1, 256), env=TORCHRUN_ENV)
    if stopped.status in ("timeout", "skipped"):
        return
    if stopped.returncode == 0:
        part.problems.append(f"{label}: finished before the SIGTERM took effect, so preemption was not tested")
        return
    loader_killed = LOADER_KILLED.search(stopped.output) is not None
    position = checkpoint_position(check, part, output_dir / "checkpoint.pth", label)
    if position is None:
        return
    # Only a preemption writes a checkpoint inside an epoch; one at iteration 0 is the last completed epoch's.
    if position[1] > 0:
        part.figures[f"{label}: stopped at"] = f"epoch {position[0]}, iteration {position[1]}"
        if loader_killed:
            part.notes.append(f"{label}: training stopped cleanly, but only by winning a race: {LOADER_ADVICE}")
    else:
        part.problems.append(f"{label}: SIGTERM to torchrun did not stop training cleanly mid-epoch (exit "
                             f"{stopped.returncode}; the checkpoint is that of epoch {position[0]}'s start)"
                             + (f"; {LOADER_ADVICE}" if loader_killed else ""))

    resumed = check.step(part, f"pretrain_{precision}_resumed", command, check.limit(part, "pretrain"),
                         env=TORCHRUN_ENV)
    if not part.succeeded(resumed, f"{label}: the rerun"):
        return
    resumed_at = TrainingLog.read(output_dir).resumed_at()
    if resumed_at is None:
        part.notes.append(f"{label}: where the rerun resumed is {NOT_RECORDED} (resumed_from_epoch)")
    else:
        part.figures[f"{label}: resumed at"] = f"epoch {resumed_at[0]}, iteration {resumed_at[1]}"
        part.expect(resumed_at == position, f"{label}: resumed at epoch {resumed_at[0]}, iteration {resumed_at[1]}, "
                                            f"not where it stopped (epoch {position[0]}, iteration {position[1]})")
    record_training(check, part, output_dir, precision, label)


def evaluate(check: Check, part: Part, checkpoint: Path, data: Path, runs: Path) -> None:
    """k-NN, one epoch of linear probe and the attention maps of ``checkpoint``."""
    workers = ("--num_workers", str(check.plan.workers))
    knn = check.step(part, "knn", [check.python, "eval_knn.py", "--pretrained_weights", checkpoint,
                                   "--data_path", data, *EVAL_SIZE_FLAGS, "--nb_knn", "10", "20", *workers,
                                   "--output_dir", runs / "knn"], check.limit(part, "knn"))
    # eval_knn.py writes no file for a plain k-NN: its result lines are what there is.
    top1 = dict(re.findall(r"(\d+)-NN classifier result: Top1: ([\d.]+)", knn.output))
    if part.succeeded(knn, "eval_knn.py") and part.expect(bool(top1), "eval_knn.py printed no accuracy"):
        part.figures.update({f"k-NN top-1 (k={k})": float(value) for k, value in top1.items()})

    linear_dir = runs / "linear"
    linear = check.step(part, "linear", [check.python, "eval_linear.py", "--pretrained_weights", checkpoint,
                                         "--data_path", data, *EVAL_SIZE_FLAGS, "--epochs", "1", *workers,
                                         "--output_dir", linear_dir], check.limit(part, "linear"))
    if part.succeeded(linear, "eval_linear.py"):
        records = TrainingLog.read(linear_dir).records
        if part.expect(bool(records) and "best_acc" in records[-1], "eval_linear.py logged no accuracy"):
            part.figures["linear top-1 (1 epoch)"] = round(records[-1]["best_acc"], 1)

    viz_dir = runs / "visualize"
    viz = check.step(part, "visualize", [check.python, "visualize_sparo.py", "--pretrained_weights", checkpoint,
                                         "--images", data / "val", "--max_images", "3", "--image_size",
                                         str(IMAGE_SIDE), "--device", check.plan.device, "--output_dir", viz_dir],
                     check.limit(part, "visualize"))
    if part.succeeded(viz, "visualize_sparo.py"):
        missing = [name for name in ("slots.png", "heads.png") if not (viz_dir / name).exists()]
        if part.expect(not missing, f"visualize_sparo.py wrote no {', '.join(missing)}"):
            part.figures["attention maps"] = "slots.png, heads.png written"


def summarise(figures: dict[str, Any], labels: tuple[str, str]) -> str:
    pieces = []
    for label in labels:
        rate = figures.get(f"{label}: images/s (median)")
        if isinstance(rate, float):
            memory = figures.get(f"{label}: max mem MB")
            pieces.append(f"{label} {rate} img/s" + (f", max mem {memory} MB" if isinstance(memory, int) else ""))
    if f"{labels[0]}: resumed at" in figures and f"{labels[0]}: stopped at" in figures:
        pieces.append(f"stopped and resumed at {figures[f'{labels[0]}: resumed at']}")
    pieces += [f"{name} {figures[name]}" for name in ("k-NN top-1 (k=20)", "linear top-1 (1 epoch)") if name in figures]
    return "; ".join(pieces)


def check_end_to_end(check: Check, part: Part) -> None:
    data, runs = check.work_dir / "classes", check.work_dir / "runs"
    images = check.step(part, "images", check.module_command("images", "classes", data,
                                                             *check.plan.images_per_class), check.limit(part, "images"))
    if not part.succeeded(images, "generating the image set"):
        return
    first, second = check.plan.precisions
    labels = (f"{first} (SIGTERM, resume)", f"{second}")
    preempted_dir = runs / "pretrain_preempted"
    pretrain_preempted_and_resumed(check, part, pretrain_command(check, data / "train", preempted_dir, first),
                                   preempted_dir, first, labels[0])
    straight_dir = runs / "pretrain_straight"
    straight = check.step(part, f"pretrain_{second}", pretrain_command(check, data / "train", straight_dir, second),
                          check.limit(part, "pretrain"), env=TORCHRUN_ENV)
    if part.succeeded(straight, f"{labels[1]}: main_dino.py"):
        record_training(check, part, straight_dir, second, labels[1])

    checkpoint = preempted_dir / "checkpoint.pth"
    if part.expect(checkpoint.exists(), f"no checkpoint from the {first} run: evaluations not run"):
        evaluate(check, part, checkpoint, data, runs)
    part.headline = summarise(part.figures, labels)
