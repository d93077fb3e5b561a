"""Run by tests/test_distributed.py under torchrun: trains a few iterations, then saves what each rank holds."""
import os
import sys

import torch

from dino_sparo.distributed import destroy_distributed, get_rank, get_world_size
from dino_sparo.loss import DINOLoss
from dino_sparo.train import train_dino
from dino_sparo.train.config import parse_config


def main() -> None:
    out = sys.argv[-1]
    result = train_dino(parse_config(sys.argv[1:-1]))
    rank = get_rank()
    probe = DINOLoss(8, 2, 0.04, 0.04, 0, 1)
    probe.update_center(torch.arange(8.0).repeat(4, 1) + rank)  # rank r contributes rows arange(8) + r
    torch.save({"teacher": result.teacher.state_dict(), "center": result.dino_loss.center.clone(),
                "probe_center": probe.center.clone(), "world_size": get_world_size()},
               os.path.join(out, f"rank{rank}.pt"))
    destroy_distributed()


if __name__ == "__main__":
    main()
