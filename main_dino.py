"""DINO pretraining with a SPARO read-out. Single process: ``python main_dino.py --data_path DIR``;
several: ``torchrun --nproc_per_node N main_dino.py ...``; a recipe: ``--config configs/vits16_1gpu.yaml``;
built-in demo: ``python main_dino.py --demo``.

Exit status: 0 done, 1 non-finite loss, 2 bad input (also an output folder that cannot be written, or out of device
memory), 3 preempted (state saved: run the same command again), 4 another process of the job died or stopped
responding (run the same command again).
"""
from __future__ import annotations

from collections.abc import Sequence

from dino_sparo.distributed import destroy_distributed
from dino_sparo.errors import run_cli
from dino_sparo.train import TrainResult, train_dino
from dino_sparo.train.config import parse_config
from dino_sparo.train.flags import get_args_parser

__all__ = ["get_args_parser", "main"]


def main(argv: Sequence[str] | None = None) -> TrainResult:
    config = parse_config(argv)
    try:
        return train_dino(config)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    run_cli(main)
