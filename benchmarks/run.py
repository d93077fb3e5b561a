"""One entry point for every benchmark: prints a table per benchmark and writes all rows to JSON. The JSON file is
rewritten atomically after every group of rows (a training-step architecture and read-out, a loader transform, a
benchmark), so that a run killed midway leaves every row it finished in a complete file.

    python -m benchmarks.run                       # training step, data pipeline and k-NN, baseline vs fast
    python -m benchmarks.run --bench train --arch vit_small --readout cls sparo --batch_size 64 \\
        --local_crops_number 8 --compile           # the GPU table
    python -m benchmarks.run --bench loader        # multi-worker DataLoader throughput, every core
    python -m benchmarks.run --bench train --readout sparo --baseline false --freeze_blocks all  # retrofit step
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dino_sparo.cli import (
    BARE_IS_TRUE,
    ArgumentParser,
    block_count_or_all,
    bool_flag,
    ensure_writable_dir,
    positive_int,
)
from dino_sparo.distributed import resolve_device
from dino_sparo.errors import UserError, run_cli
from dino_sparo.models import ARCHS, READOUTS
from dino_sparo.train.flags import PRECISIONS
from dino_sparo.utils.files import write_json_atomic

from .common import print_table
from .loader import TRANSFORMS as LOADER_TRANSFORMS
from .loader import bench_loader
from .machine import describe_machine

BENCHES = ("train", "data", "knn", "loader")
DEFAULT_BENCHES = ("train", "data", "knn")  # the loader bench takes every core, so it runs only when named
COLUMNS = {
    "train": ["config", "arch", "readout", "mode", "precision", "compile", "images_per_s", "seconds", "peak_mib",
              "speedup", "memory_ratio", "gflop_per_image", "mfu", "skipped_steps"],
    "data": ["config", "mode", "worker_core_ms", "main_core_ms", "images_per_s", "seconds", "speedup"],
    "knn": ["config", "mode", "seconds", "top1", "top5", "speedup", "identical"],
    "loader": ["config", "mode", "workers", "images_per_s", "seconds"],
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser("python -m benchmarks.run", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bench", nargs="+", choices=BENCHES, default=list(DEFAULT_BENCHES),
                        help="benchmarks to run")
    parser.add_argument("--baseline", type=bool_flag, **BARE_IS_TRUE, default=True,
                        help="also run the reference-style baseline (fp16 + GradScaler on a GPU, fp32 on a CPU, as "
                        "the reference trains by default; explicit attention, Python-loop EMA, per-step sync, PIL "
                        "per-crop augmentation, reference k-NN loop) and report fast/baseline ratios measured in "
                        "this run")
    parser.add_argument("--fast", type=bool_flag, **BARE_IS_TRUE, default=True,
                        help="run this project's default fast paths")
    parser.add_argument("--json", default="benchmark_results.json",
                        help="where to write all rows and the machine (rewritten after every group of rows)")

    group = parser.add_argument_group("training step")
    group.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["vit_small"])
    group.add_argument("--readout", nargs="+", choices=READOUTS, default=["cls", "sparo"])
    group.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["auto"],
                       help="precisions of the fast path (the baseline's is the reference's: fp16 on a GPU, fp32 on "
                       "a CPU); auto = what training uses")
    group.add_argument("--compile", type=bool_flag, **BARE_IS_TRUE, default=False,
                       help="also time the fast path with each transformer block compiled (as main_dino.py --compile)")
    group.add_argument("--profile", type=bool_flag, **BARE_IS_TRUE, default=False,
                       help="print a torch.profiler table of each fast step by category (ms per step)")
    group.add_argument("--batch_size", type=positive_int, default=4, help="images per step")
    group.add_argument("--local_crops_number", type=int, default=4, help="local crops per image (plus 2 global)")
    group.add_argument("--global_crop_size", type=positive_int, default=224)
    group.add_argument("--local_crop_size", type=positive_int, default=96)
    group.add_argument("--out_dim", type=positive_int, default=65536)
    group.add_argument("--depth", type=positive_int, default=None, help="override the architecture's depth")
    group.add_argument("--steps", type=positive_int, default=5,
                       help="timed steps per configuration, interleaved (baseline, fast, baseline, ...); the best "
                       "step of each is kept")
    group.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--freeze_blocks", type=block_count_or_all, default=None,
                       help="also time a retrofit step (embeddings and the first K blocks frozen, their output shared "
                       "by student and teacher) next to each fast step; its speedup is against that full step")

    group = parser.add_argument_group("multi-crop data pipeline (one worker thread)")
    group.add_argument("--images", default=None, help="folder of photos (default: scikit-learn's sample JPEGs)")
    group.add_argument("--data_local_crops", type=int, default=8, help="local crops per image")
    group.add_argument("--data_images", type=positive_int, default=40, help="images per timed pass")
    group.add_argument("--data_rounds", type=positive_int, default=3,
                       help="interleaved passes (baseline, fast, baseline, ...); the best of each is kept")

    group = parser.add_argument_group("data loader (worker processes; crops as the data pipeline's)")
    group.add_argument("--loader_transform", nargs="+", choices=sorted(LOADER_TRANSFORMS), default=["pil", "uint8"],
                       help="multi-crop transforms, by name: pil (the reference chain) and uint8 (the workers' half "
                       "of the fast path)")
    group.add_argument("--loader_workers", type=int, default=os.cpu_count(), help="DataLoader worker processes")
    group.add_argument("--loader_images", type=positive_int, default=1024,
                       help="images per pass (generated 500x375 JPEGs); one warm-up pass, then 3 timed passes")

    group = parser.add_argument_group("k-NN")
    group.add_argument("--knn_train", type=positive_int, default=50000)
    group.add_argument("--knn_test", type=positive_int, default=5000)
    group.add_argument("--knn_dim", type=positive_int, default=384)
    group.add_argument("--knn_classes", type=positive_int, default=1000)
    group.add_argument("--knn_k", type=positive_int, default=20)
    group.add_argument("--knn_repeats", type=positive_int, default=3)
    return parser


def train_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = dict(batch_size=args.batch_size, local_crops=args.local_crops_number, out_dim=args.out_dim,
                  global_crop_size=args.global_crop_size, local_crop_size=args.local_crop_size, depth=args.depth,
                  device=args.device, warmup=args.warmup)
    configs = []
    for arch, readout in itertools.product(args.arch, args.readout):
        if args.baseline:
            configs.append(dict(common, arch=arch, readout=readout, mode="baseline", precision="reference",
                                compile=False))
        if args.fast:
            for precision, compiled in itertools.product(args.precision, (False, True) if args.compile else (False,)):
                configs.append(dict(common, arch=arch, readout=readout, mode="fast", precision=precision,
                                    compile=compiled, profile=args.profile))
                if args.freeze_blocks is not None:
                    configs.append(dict(configs[-1], mode="retrofit", freeze_blocks=args.freeze_blocks))
    return configs


def bench_rows(bench: str, args: argparse.Namespace, modes: list[str], device: torch.device
               ) -> Iterator[list[dict[str, Any]]]:
    """The rows of ``bench``, in groups, each yielded as soon as it is measured."""
    if bench == "train":
        from .train_step import bench_train

        # One group per architecture and read-out: its baseline and fast steps are timed interleaved in one
        # process, as the ratios need, and its rows are saved before the next group starts.
        configs = train_configs(args)
        for key in dict.fromkeys((config["arch"], config["readout"]) for config in configs):
            yield bench_train([c for c in configs if (c["arch"], c["readout"]) == key], args.steps, args.warmup)
    elif bench == "data":
        from .data import bench_data, sample_photos

        yield bench_data(sample_photos(args.images), args.data_local_crops, args.global_crop_size,
                         args.local_crop_size, args.data_images, args.data_rounds, modes)
    elif bench == "loader":
        for transform in args.loader_transform:
            yield bench_loader(transform, args.loader_workers, args.loader_images, args.data_local_crops,
                               args.global_crop_size, args.local_crop_size)
    else:
        from .knn import bench_knn

        yield bench_knn(args.knn_train, args.knn_test, args.knn_dim, args.knn_classes, args.knn_k,
                        args.knn_repeats, device, modes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if not (args.baseline or args.fast):
        raise UserError("--baseline false and --fast false leave nothing to run")
    if args.local_crops_number < 0 or args.data_local_crops < 0:
        raise UserError("local crop counts must be >= 0")
    if args.loader_workers < 0:
        raise UserError("--loader_workers must be >= 0")
    ensure_writable_dir(os.path.dirname(os.path.abspath(args.json)), flag="--json")
    device = resolve_device(args.device)  # a bad --device is an error before anything runs
    modes = [m for m, on in (("baseline", args.baseline), ("fast", args.fast)) if on]
    machine = describe_machine()
    print(f"machine: {machine}", flush=True)
    results: dict[str, Any] = {"machine": machine, "argv": list(sys.argv[1:] if argv is None else argv), "rows": []}
    write_json_atomic(results, args.json)
    for bench in args.bench:
        print(f"\n== {bench} ==", flush=True)
        rows: list[dict[str, Any]] = []
        for group in bench_rows(bench, args, modes, device):
            rows += group
            results["rows"] += group
            write_json_atomic(results, args.json)
        print_table(rows, [c for c in COLUMNS[bench] if any(c in row for row in rows)])
        profiled = [row for row in rows if "profile_ms" in row]
        if profiled:
            print("\nms per step by category (torch.profiler, self time of every op):")
            print_table([{"step": f"{row['readout']} {row['mode']} {row['precision']}"
                                  + (" compiled" if row["compile"] else ""), **row["profile_ms"]} for row in profiled],
                        ["step", *profiled[0]["profile_ms"]])
        if bench == "data" and len(rows) == 2:
            from .data import summary_line

            print(summary_line(rows))
    print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main)
