"""Where each SPARO slot looks: per-slot attention heat maps over images, next to DINO's per-head CLS attention.

    python visualize_sparo.py --pretrained_weights runs/demo/checkpoint.pth --images some/folder \
        --top_slots 8 --output_dir runs/demo/viz
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from dino_sparo.cli import ArgumentParser, flag_names, positive_int, slot_list
from dino_sparo.errors import run_cli
from dino_sparo.eval.slot_stats import PEAKEDNESS_HELP
from dino_sparo.models.flags import add_model_args
from dino_sparo.viz.run import DEFAULT_TOP_SLOTS, visualize


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        "visualize_sparo.py", description="Writes slots.png (one row per slot, one column per image), heads.png "
        "(CLS self-attention of each head of the last remaining block) and summary.json to --output_dir.")
    parser.add_argument("--pretrained_weights", required=True,
                        help="checkpoint: this project's (architecture from its saved args) or DINO-format")
    parser.add_argument("--checkpoint_key", default="teacher",
                        help="sub-dict holding the weights (default: %(default)s)")
    parser.add_argument(*flag_names("--images"), nargs="+", required=True,
                        help="image files and/or folders (searched recursively); --image_path is the name DINO's "
                        "visualize_attention.py uses")
    parser.add_argument("--max_images", type=positive_int, default=None, help="use at most this many images")
    parser.add_argument("--output_dir", default="viz", help="where the PNGs and summary.json go (default: %(default)s)")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--slots", type=slot_list, default=None, help="slots to draw, e.g. 1,5,9")
    selection.add_argument("--top_slots", type=positive_int, default=None,
                           help=f"draw the K most peaked slots; {PEAKEDNESS_HELP} "
                           f"(default when no --slots: {DEFAULT_TOP_SLOTS})")
    parser.add_argument("--attribute", default=None, metavar="ATTR",
                        help="draw the slots best at this attribute (k-NN top-1 from eval_knn.py --per_slot "
                        "--attributes; --top_slots K of them, default 4), labelled with their accuracy")
    parser.add_argument("--slot_matrix", default=None, metavar="JSON",
                        help="the knn_slot_attributes.json --attribute reads (default: the one beside "
                        "--pretrained_weights)")
    parser.add_argument("--image_size", type=positive_int, nargs="+", default=[224],
                        help="one size: shorter side (aspect kept); two: height width. Each side is then "
                        "centre-cropped down to a multiple of the patch size (default: %(default)s)")
    parser.add_argument("--tile_size", type=positive_int, default=224,
                        help="height in pixels of each drawn tile (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="heat-map opacity over the image, 0-1; maps are min-max scaled per tile "
                        "(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    add_model_args(parser, from_checkpoint=True)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    return visualize(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
