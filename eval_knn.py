"""k-NN evaluation of frozen features (DINO's protocol) for CLS and SPARO encodings, with per-slot analysis.

    python eval_knn.py --pretrained_weights out/checkpoint.pth --data_path /path/to/imagenet
    torchrun --nproc_per_node 8 eval_knn.py --pretrained_weights out/checkpoint.pth --data_path /path/to/imagenet
"""
from __future__ import annotations

import argparse

from dino_sparo.cli import BARE_IS_TRUE, ArgumentParser, bool_flag, positive_int
from dino_sparo.errors import run_cli
from dino_sparo.eval.flags import add_common_eval_args
from dino_sparo.eval.knn_eval import evaluate_knn


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="eval_knn.py", description="Evaluation with weighted k-NN on frozen features")
    add_common_eval_args(parser, data_required=False)
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=positive_int,
                        help="numbers of nearest neighbours to evaluate (20 is usually the best)")
    parser.add_argument("--temperature", dest="temperatures", default=[0.07], nargs="+", type=float, metavar="T",
                        help="temperature(s) T of the weights exp(sim / T) (default: 0.07, DINO's); several, e.g. "
                        "0.07 0.1 0.2, sweep every (k, T) from one feature extraction. The first is printed in "
                        "DINO's format and used by the slot and attribute analyses")
    parser.add_argument("--use_cuda", default=True, type=bool_flag, **BARE_IS_TRUE,
                        help="keep the features on the GPU for the k-NN (set false if it runs out of memory)")
    parser.add_argument("--dump_features", default=None,
                        help="folder to save trainfeat.pth, testfeat.pth, trainlabels.pth, testlabels.pth into")
    parser.add_argument("--load_features", default=None,
                        help="folder to load those features from instead of extracting them")
    slots = parser.add_argument_group("SPARO slots")
    slots.add_argument("--per_slot", action="store_true",
                       help="also report the k-NN accuracy of every single slot on val, best first (table and "
                       "OUTPUT_DIR/knn_per_slot.json)")
    slots.add_argument("--select_slots", type=positive_int, default=None, metavar="K",
                       help="choose K slots using only the training set (k-NN of a held-out part of train against "
                       "the rest) and report their val accuracy next to all slots (OUTPUT_DIR/knn_slot_selection.json)")
    slots.add_argument("--slot_knn", type=positive_int, default=20,
                       help="k of the per-slot k-NN used by --per_slot and --select_slots (default: 20)")
    slots.add_argument("--select_holdout", type=float, default=0.1,
                       help="fraction of train held out to score slots for --select_slots (default: 0.1)")
    slots.add_argument("--seed", type=int, default=0, help="fixes the held-out part of train (default: 0)")
    slots.add_argument("--output_dir", default=None,
                       help="where knn.json (every (k, T)) and the slot JSON files are written (default: nowhere "
                       "for a plain k-NN; the folder of --pretrained_weights for the slot and attribute analyses)")
    attributes = parser.add_argument_group("attribute labels (which slot knows what)")
    attributes.add_argument("--attributes", default=None, metavar="CSV",
                            help="CSV with one row per image: a 'path' column relative to --data_path and one "
                            "column per attribute (the demo's attributes.csv); each of --attribute_columns is "
                            "evaluated as its own label set (OUTPUT_DIR/knn_attributes.json)")
    attributes.add_argument("--attribute_columns", default=None, metavar="NAMES",
                            help="comma-separated CSV columns to evaluate, e.g. shape,colour,size,background")
    attributes.add_argument("--attribute_bins", type=positive_int, default=4,
                            help="numeric columns are binned into this many quantiles of the train images "
                            "(default: 4)")
    attributes.add_argument("--select_for", default=None, metavar="ATTR",
                            help="with --select_slots K: choose the K slots best at this attribute on held-out train "
                            "images and report val top-1 on every attribute for them and for all slots "
                            "(OUTPUT_DIR/knn_slot_selection_for_ATTR.json)")
    attributes.add_argument("--compare_weights", default=None, metavar="CHECKPOINT",
                            help="with --per_slot: add this model's whole encoding (e.g. a CLS checkpoint) as a "
                            "row of the slot x attribute matrix")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    return evaluate_knn(args)


if __name__ == "__main__":
    run_cli(main)
