"""What each mode of the check runs: time limits, sizes, precisions and the commands' flags."""
from __future__ import annotations

from dataclasses import dataclass

from benchmarks.machine import usable_cores

# Time limits of single commands (seconds); each is also cut to what is left of its part and of the check.
STEP_LIMITS_S = {"environment": 60, "pytest": 100, "images": 30, "pretrain": 60, "checkpoint": 30, "knn": 40,
                 "linear": 40, "visualize": 40, "photos": 30, "pretrain_speed": 110, "loader": 45,
                 "train_bench": 170}

# The small pretraining recipe of part 3 (about 15 iterations per epoch on the GPU image set).
PRETRAIN_FLAGS = ("--arch", "vit_tiny", "--patch_size", "8", "--depth", "4", "--out_dim", "1024",
                  "--head_hidden_dim", "256", "--head_bottleneck_dim", "64", "--global_crop_size", "32",
                  "--local_crop_size", "16", "--local_crops_number", "2", "--batch_size_per_gpu", "16",
                  "--epochs", "3", "--warmup_epochs", "1", "--saveckp_freq", "0", "--log_freq", "2")
EVAL_SIZE_FLAGS = ("--resize_size", "36", "--crop_size", "32")
IMAGE_SIDE = 64  # of the generated class images of part 3


@dataclass(frozen=True)
class SpeedRun:
    """The pretraining-speed part: main_dino.py on generated JPEGs until ``epochs`` epochs are done or
    ``stop_after_s`` seconds have passed, when it gets SIGTERM (it then saves and stops, exit status 3)."""

    flags: tuple[str, ...]
    distinct_photos: int  # generated JPEGs; the training folder cycles over them
    images: int  # files in the training folder (links to the distinct photos)
    epochs: int
    stop_after_s: float


@dataclass(frozen=True)
class Plan:
    """What one mode of the check runs: time limits (seconds), sizes and precisions."""

    mode: str
    total_limit_s: float
    compile_reserve_s: float  # the end of the check kept for torch.compile: every other command ends before it
    compile_limit_s: float  # torch.compile's own limit: its reserve and what the other commands left unused
    part_limits_s: dict[str, float]
    images_per_class: tuple[int, int]  # train, val
    precisions: tuple[str, str]  # the run stopped by SIGTERM and resumed, the straight run
    device: str
    workers: int  # data-loading processes of each script of part 3
    speed_run: SpeedRun
    train_bench_shape: tuple[str, ...]
    train_bench_flags: tuple[str, ...]
    compile_bench_flags: tuple[str, ...]
    loader_flags: tuple[str, ...]
    notes: tuple[str, ...] = ()


def _workers_beside_training() -> int:
    """DataLoader workers for one training process: every usable core but the one it runs on."""
    return max(0, usable_cores() - 1)


def gpu_plan() -> Plan:
    # Measured on an H200 (16 cores) by an earlier version: environment 4 s, CUDA tests 15 s (one test ran), end to
    # end 84 s, throughput without torch.compile 94 s. Expected now: 5 + 40 + 90 + 85 (pretraining speed: 70 s of
    # training) + 110 = 330 s of the 480 - 120 = 360 s that every command but torch.compile must end within; the
    # compilation gets its 120 s and whatever the others left, and the whole check ends by 480 s (540 s allowed).
    return Plan(
        mode="GPU",
        total_limit_s=480,
        compile_reserve_s=120,
        compile_limit_s=240,
        part_limits_s={"environment": 30, "cuda_tests": 100, "end_to_end": 150, "pretraining_speed": 120,
                       "throughput": 200},
        images_per_class=(40, 10),
        precisions=("bf16", "fp16"),
        device="cuda",
        workers=4,
        # ViT-S/16 as DINO trains it on ImageNet, with the defaults (precision and augmentation device auto).
        speed_run=SpeedRun(
            flags=("--arch", "vit_small", "--patch_size", "16", "--out_dim", "65536", "--batch_size_per_gpu", "64",
                   "--local_crops_number", "8", "--global_crop_size", "224", "--local_crop_size", "96",
                   "--warmup_epochs", "1", "--saveckp_freq", "0", "--viz_freq", "0", "--log_freq", "50",
                   "--device", "cuda", "--num_workers", str(_workers_beside_training())),
            # 200 iterations per epoch: about 15 s at the step's 900 img/s, so several epochs fit and the first
            # (worker start, cuDNN autotuning) can be told apart.
            distinct_photos=256, images=12800, epochs=4, stop_after_s=70),
        train_bench_shape=("--arch", "vit_small", "--batch_size", "64", "--local_crops_number", "8", "--out_dim",
                           "65536", "--precision", "bf16", "--steps", "5", "--warmup", "2"),
        train_bench_flags=("--readout", "cls", "sparo"),
        # torch.compile for SPARO only: compiling CLS too does not fit the time limit.
        compile_bench_flags=("--readout", "sparo", "--baseline", "false", "--compile"),
        loader_flags=("--loader_workers", str(usable_cores()), "--loader_images", "1024"),
        notes=("torch.compile is timed for SPARO only, last, in the time reserved for it: compiling CLS too does "
               "not fit the time limit.",),
    )


def dry_run_plan() -> Plan:
    return Plan(
        mode="dry run (CPU)",
        total_limit_s=270,
        # Too little to compile on two cores: it is the path of a compilation running over its time that is tried.
        compile_reserve_s=15,
        compile_limit_s=15,
        part_limits_s={"environment": 60, "cuda_tests": 60, "end_to_end": 150, "pretraining_speed": 60,
                       "throughput": 90},
        images_per_class=(16, 4),
        precisions=("fp32", "fp32"),
        device="cpu",
        workers=2,
        speed_run=SpeedRun(
            flags=("--arch", "vit_tiny", "--depth", "2", "--patch_size", "16", "--out_dim", "256",
                   "--head_hidden_dim", "64", "--head_bottleneck_dim", "32", "--batch_size_per_gpu", "4",
                   "--local_crops_number", "2", "--global_crop_size", "32", "--local_crop_size", "16",
                   "--warmup_epochs", "1", "--saveckp_freq", "0", "--viz_freq", "0", "--log_freq", "4",
                   "--device", "cpu", "--num_workers", str(_workers_beside_training())),
            distinct_photos=8, images=32, epochs=2, stop_after_s=45),
        train_bench_shape=("--arch", "vit_tiny", "--depth", "2", "--batch_size", "2", "--local_crops_number", "2",
                           "--out_dim", "256", "--global_crop_size", "32", "--local_crop_size", "16", "--precision",
                           "fp32", "--steps", "1", "--warmup", "0", "--device", "cpu"),
        train_bench_flags=("--readout", "sparo"),  # one read-out: each configuration costs processes
        compile_bench_flags=("--readout", "sparo", "--baseline", "false", "--compile"),
        loader_flags=("--loader_workers", "2", "--loader_images", "16"),
        notes=("Dry run: CPU paths and tiny sizes only; no figure here says anything about a GPU.",
               "The loader and the step are measured at different crop sizes here, so 'keeps up' is not meaningful."),
    )
