"""Probes on frozen features for CLS and SPARO encodings: a grid of linear classifiers (DINOv2's linear evaluation,
chosen on held-out training images), DINO's single linear classifier (--lr), Efficient Probing and the
cross-attention pooler (--probe attentive / cross_attention). See docs/probes.md.

    python eval_linear.py --pretrained_weights out/checkpoint.pth --data_path /path/to/imagenet --output_dir lin
    python eval_linear.py --pretrained_weights out/checkpoint.pth --data_path /path/to/imagenet --lr 0.001
    python eval_linear.py --pretrained_weights out/checkpoint.pth --data_path /path/to/imagenet --probe attentive
    torchrun --nproc_per_node 8 eval_linear.py --pretrained_weights out/checkpoint.pth --data_path /path/to/imagenet
"""
from __future__ import annotations

import argparse

from dino_sparo.cli import BARE_IS_TRUE, ArgumentParser, bool_flag, positive_int
from dino_sparo.errors import run_cli
from dino_sparo.eval.flags import add_common_eval_args
from dino_sparo.eval.linear import evaluate_linear
from dino_sparo.eval.probes.heads import PROBES
from dino_sparo.eval.probes.inputs import FeatureSet
from dino_sparo.eval.probes.recipes import RECIPES


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="eval_linear.py", description="Evaluation with linear classification on frozen "
                            "features (or attentive probes); see docs/probes.md")
    add_common_eval_args(parser)
    parser.add_argument("--n_last_blocks", type=int, default=None,
                        help="concatenate the CLS tokens of the last n blocks (default: 4 for the cls read-out, as "
                        "DINO for ViT-S (ViT-B: 1 with --avgpool_patchtokens true); 0 for sparo/gap, whose "
                        "encoding is the feature; n > 0 adds the last n CLS tokens to it)")
    parser.add_argument("--avgpool_patchtokens", type=bool_flag, **BARE_IS_TRUE, default=False,
                        help="also concatenate the mean of the last block's patch tokens (DINO: true for ViT-B)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs (default: 100 with --lr, else the recipe's: dino 100, "
                        "efficient_probing 90)")
    parser.add_argument("--lr", type=float, default=None,
                        help="one learning rate for a total batch of 256, scaled linearly with the total batch size. "
                        "With the linear probe: DINO's single classifier exactly (SGD momentum 0.9, no weight decay, "
                        "cosine, best val accuracy over the epochs; DINO's value: 0.001); with an attentive probe: a "
                        "grid of one. Without it, a grid of learning rates is trained (--learning_rates)")
    parser.add_argument("--num_labels", type=positive_int, default=None,
                        help="outputs of the linear layer (default: the number of classes in train/)")
    parser.add_argument("--val_freq", type=positive_int, default=1, help="epochs between validations")
    parser.add_argument("--output_dir", default=".",
                        help="where checkpoint.pth.tar (resumed automatically) and log.txt are written")
    parser.add_argument("--evaluate", action="store_true",
                        help="only validate the classifier(s) in --linear_weights (a grid: every point, and the one "
                        "its run chose)")
    parser.add_argument("--linear_weights", default=None,
                        help="checkpoint.pth.tar written by eval_linear.py (or DINO's linear weights), for --evaluate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the training-set shuffling, the classifiers' initialisation and the held-out "
                        "images (--val_split)")
    grid = parser.add_argument_group(
        "probe grid (without --lr)",
        "Several classifiers are trained at once on the same frozen features of each batch (DINOv2's linear "
        "evaluation): every learning rate of --learning_rates for every input set. The one reported is chosen on a "
        "held-out part of the TRAINING images (--val_split), never on val: DINOv2 chooses on val, we do not. Val "
        "top-1/top-5 of every grid point go to log.txt and OUTPUT_DIR/probe_results.json.")
    grid.add_argument("--probe", choices=PROBES, default="linear",
                      help="linear (default), attentive (Efficient Probing, ICLR 2026: Q learned queries, value "
                      "projection only) or cross_attention (one cross-attention block with a learned query, as "
                      "V-JEPA and DINOv3's attention pooling)")
    grid.add_argument("--learning_rates", type=float, nargs="*", default=None, metavar="LR",
                      help="the grid of learning rates, each for a total batch of 256 (scaled linearly with the "
                      "total batch). Default: the recipe's, dino: "
                      f"{' '.join(f'{lr:g}' for lr in RECIPES['dino'].learning_rates)} (DINOv2's grid, extended to "
                      f"0.5); efficient_probing: "
                      f"{' '.join(f'{lr:g}' for lr in RECIPES['efficient_probing'].learning_rates)}")
    grid.add_argument("--val_split", type=float, default=None,
                      help="training images held out to choose the classifier on: a fraction in (0, 1) or a number "
                      "of images, drawn with --seed (default: 0.1; 0 only for a grid of one classifier)")
    grid.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                      help="; ".join(f"{name}: {recipe.summary}" for name, recipe in RECIPES.items())
                      + " (default: efficient_probing for --probe attentive, else dino)")
    grid.add_argument("--warmup_epochs", type=int, default=None,
                      help="linear warm-up epochs (default: the recipe's, dino 0, efficient_probing 1/9 of the "
                      "epochs: 10 of 90)")
    grid.add_argument("--feature_sets", type=FeatureSet.parse, nargs="*", default=None, metavar="SET",
                      help="linear probe: several feature sets, each N (CLS tokens of the last N blocks) or "
                      "N+avgpool (with the mean patch token), all from one backbone pass per batch; e.g. 1 4+avgpool "
                      "(DINOv2 tries 1, 1+avgpool, 4, 4+avgpool). Default: the one of --n_last_blocks and "
                      "--avgpool_patchtokens")
    grid.add_argument("--train_augmentation", type=bool_flag, **BARE_IS_TRUE, default=None,
                      help="DINO's random resized crop and flip of the training images (default: true). false: "
                      "training images get the evaluation view, so every view is the same each epoch and the frozen "
                      "features are extracted once and cached in OUTPUT_DIR/feature_cache (reused on resume)")
    attentive = parser.add_argument_group("attentive probes (--probe attentive / cross_attention)")
    attentive.add_argument("--probe_queries", type=int, default=None, metavar="Q",
                           help="learned queries (default: 32 for attentive, as Efficient Probing; 1 for "
                           "cross_attention); attentive: Q must divide the token width")
    attentive.add_argument("--probe_heads", type=int, default=None,
                           help="attention heads of cross_attention (default: token width / 64, as V-JEPA)")
    attentive.add_argument("--probe_cls", type=bool_flag, **BARE_IS_TRUE, default=None,
                           help="the probe reads the CLS token besides the patch tokens (default: true; Efficient "
                           "Probing's rule for encoders trained on their CLS token)")
    attentive.add_argument("--probe_registers", type=bool_flag, **BARE_IS_TRUE, default=None,
                           help="the probe also reads the register tokens (default: false)")
    parser.set_defaults(batch_size_per_gpu=128)
    return parser


def main(argv: list[str] | None = None) -> dict:
    return evaluate_linear(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
