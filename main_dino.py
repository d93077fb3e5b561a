"""DINO pretraining with a SPARO read-out. Single process: ``python main_dino.py --data_path DIR``;
several: ``torchrun --nproc_per_node N main_dino.py ...``; built-in demo: ``python main_dino.py --demo``.

Exit status: 0 done, 1 non-finite loss, 2 bad input, 3 preempted (state saved: run the same command again)."""
import sys

from dino_sparo.cli import run_cli
from dino_sparo.distributed import destroy_distributed
from dino_sparo.preemption import EXIT_PREEMPTED, Preempted
from dino_sparo.train import NonFiniteLossError, parse_args, train_dino


def main() -> None:
    args = parse_args()
    try:
        train_dino(args)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Preempted as stop:
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    run_cli(main)
