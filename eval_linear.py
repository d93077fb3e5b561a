"""Linear probe on frozen features (DINO's protocol) for CLS and SPARO encodings.

    python eval_linear.py --pretrained_weights out/checkpoint.pth --data_path /path/to/imagenet --output_dir lin
    torchrun --nproc_per_node 8 eval_linear.py --pretrained_weights out/checkpoint.pth --data_path /path/to/imagenet
"""
from __future__ import annotations

import argparse

from dino_sparo.cli import bool_flag, positive_int
from dino_sparo.errors import run_cli
from dino_sparo.eval.flags import add_common_eval_args
from dino_sparo.eval.linear import evaluate_linear


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluation with linear classification on frozen features")
    add_common_eval_args(parser)
    parser.add_argument("--n_last_blocks", type=int, default=None,
                        help="concatenate the CLS tokens of the last n blocks (default: 4 for the cls read-out, as "
                        "DINO for ViT-S (ViT-B: 1 with --avgpool_patchtokens true); 0 for sparo/gap, whose "
                        "encoding is the feature; n > 0 adds the last n CLS tokens to it)")
    parser.add_argument("--avgpool_patchtokens", type=bool_flag, default=False,
                        help="also concatenate the mean of the last block's patch tokens (DINO: true for ViT-B)")
    parser.add_argument("--epochs", type=positive_int, default=100, help="training epochs (default: 100)")
    parser.add_argument("--lr", type=float, default=0.001,
                        help="learning rate for a total batch of 256, scaled linearly with the total batch size")
    parser.add_argument("--num_labels", type=positive_int, default=None,
                        help="outputs of the linear layer (default: the number of classes in train/)")
    parser.add_argument("--val_freq", type=positive_int, default=1, help="epochs between validations")
    parser.add_argument("--output_dir", default=".",
                        help="where checkpoint.pth.tar (resumed automatically) and log.txt are written")
    parser.add_argument("--evaluate", action="store_true",
                        help="only validate the linear classifier in --linear_weights")
    parser.add_argument("--linear_weights", default=None,
                        help="checkpoint.pth.tar of a trained linear classifier, for --evaluate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training-set shuffling")
    parser.set_defaults(batch_size_per_gpu=128)
    return parser


def main(argv: list[str] | None = None) -> dict:
    return evaluate_linear(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
