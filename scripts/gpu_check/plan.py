"""What each mode of the check runs: time limits, sizes, precisions and the commands' flags.

Time: the parts' caps add up to the window every command but torch.compile must end within; torch.compile, last,
gets the reserve after it and whatever the parts left unused. A command's own limit is also cut to what is left of
its part. The GPU plan's whole check fits 7 minutes, so that on a device lent for 15 minutes, its start-up
included, a rerun of a failed part (``--parts``) still fits.
"""
from __future__ import annotations

from dataclasses import dataclass

from benchmarks.machine import usable_cores

# Part 3's pretraining: the demo recipe (configs/demo.yaml), shortened (about 15 iterations per epoch on the GPU
# image set).
PRETRAIN_FLAGS = ("--config", "demo", "--batch_size_per_gpu", "16", "--epochs", "3", "--saveckp_freq", "0",
                  "--log_freq", "2")
EVAL_SIZE_FLAGS = ("--resize_size", "36", "--crop_size", "32")
IMAGE_SIDE = 64  # of the generated class images of part 3
PART_KEYS = ("environment", "cuda_tests", "end_to_end", "pretraining_speed", "throughput")


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
    part_limits_s: dict[str, float]  # each part's cap, in the order of PART_KEYS
    compile_reserve_s: float  # the end of the check kept for torch.compile, after every other command
    step_limits_s: dict[str, dict[str, float]]  # part -> command -> its own limit (never above the part's cap)
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

    def total_limit_s(self, parts: tuple[str, ...] = PART_KEYS) -> float:
        """The longest the check of ``parts`` may take: their caps, and the compile reserve with the throughput
        part."""
        return sum(self.part_limits_s[key] for key in parts) + \
            (self.compile_reserve_s if "throughput" in parts else 0.0)


def _workers_beside_training() -> int:
    """DataLoader workers for one training process: every usable core but the one it runs on."""
    return max(0, usable_cores() - 1)


def gpu_plan() -> Plan:
    # Expected on one H200 with 16 cores (an earlier version measured environment 4 s, end to end 84 s, throughput
    # without torch.compile 94 s): environment 5 s; CUDA tests 30 s (only the test modules that mark tests cuda
    # are collected); end to end 80 s; pretraining speed 60 s (SIGTERM after 45 s); throughput 75 s; then
    # torch.compile of SPARO, three graphs (global and local crops, the teacher), in its 90 s and what is left.
    return Plan(
        mode="GPU",
        part_limits_s={"environment": 15, "cuda_tests": 60, "end_to_end": 100, "pretraining_speed": 75,
                       "throughput": 80},
        compile_reserve_s=90,
        step_limits_s={"environment": {"environment": 15}, "cuda_tests": {"pytest": 60},
                       "end_to_end": {"images": 20, "pretrain": 35, "checkpoint": 15, "knn": 25, "linear": 25,
                                      "visualize": 20},
                       "pretraining_speed": {"photos": 20, "main_dino": 70},
                       "throughput": {"loader": 25, "train_bench": 75}},
        images_per_class=(40, 10),
        precisions=("bf16", "fp16"),
        device="cuda",
        workers=4,
        # ViT-S/16 as DINO trains it on ImageNet (configs/vits16_imagenet_8gpu.yaml, per GPU), with the defaults
        # (precision and augmentation device auto).
        speed_run=SpeedRun(
            flags=("--config", "vits16_imagenet_8gpu", "--warmup_epochs", "1", "--saveckp_freq", "0", "--viz_freq",
                   "0", "--log_freq", "50", "--device", "cuda", "--num_workers", str(_workers_beside_training())),
            # 200 iterations per epoch: 6-14 s at 900-2000 img/s, so that several epochs fit and the first
            # (worker start, cuDNN autotuning) can be told apart.
            distinct_photos=256, images=12800, epochs=4, stop_after_s=45),
        train_bench_shape=("--arch", "vit_small", "--batch_size", "64", "--local_crops_number", "8", "--out_dim",
                           "65536", "--precision", "bf16", "--steps", "5", "--warmup", "2"),
        train_bench_flags=("--readout", "cls", "sparo"),
        # torch.compile for SPARO only: compiling CLS too does not fit the time limit.
        compile_bench_flags=("--readout", "sparo", "--baseline", "false", "--compile"),
        loader_flags=("--loader_workers", str(usable_cores()), "--loader_images", "512"),
        notes=("torch.compile is timed for SPARO only, last, in the time reserved for it: compiling CLS too does "
               "not fit the time limit.",),
    )


def dry_run_plan() -> Plan:
    return Plan(
        mode="dry run (CPU)",
        part_limits_s={"environment": 30, "cuda_tests": 40, "end_to_end": 130, "pretraining_speed": 50,
                       "throughput": 70},
        # Too little to compile on two cores: it is the path of a compilation running over its time that is tried.
        compile_reserve_s=15,
        step_limits_s={"environment": {"environment": 30}, "cuda_tests": {"pytest": 40},
                       "end_to_end": {"images": 20, "pretrain": 45, "checkpoint": 20, "knn": 30, "linear": 30,
                                      "visualize": 30},
                       "pretraining_speed": {"photos": 20, "main_dino": 45},
                       "throughput": {"loader": 25, "train_bench": 45}},
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
            distinct_photos=8, images=32, epochs=2, stop_after_s=30),
        train_bench_shape=("--arch", "vit_tiny", "--depth", "2", "--batch_size", "2", "--local_crops_number", "2",
                           "--out_dim", "256", "--global_crop_size", "32", "--local_crop_size", "16", "--precision",
                           "fp32", "--steps", "1", "--warmup", "0", "--device", "cpu"),
        train_bench_flags=("--readout", "sparo"),  # one read-out: each configuration costs processes
        compile_bench_flags=("--readout", "sparo", "--baseline", "false", "--compile"),
        loader_flags=("--loader_workers", "2", "--loader_images", "16"),
        notes=("Dry run: CPU paths and tiny sizes only; no figure here says anything about a GPU.",
               "The loader and the step are measured at different crop sizes here, so 'keeps up' is not meaningful."),
    )
