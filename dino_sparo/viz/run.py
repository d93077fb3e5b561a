"""The visualisation run behind ``visualize_sparo.py``: per-slot and per-head attention grids plus a summary."""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..cli import ensure_writable_dir
from ..distributed import resolve_device
from ..errors import UserError
from ..eval.slot_stats import PEAKEDNESS_HELP, SlotStatistics, slot_statistics
from ..eval.slots import check_slots
from ..logger import setup_logging
from ..models.factory import build_pretrained_backbone
from ..utils.files import write_json_atomic
from . import render
from .attention import head_cls_attention, patch_grid, slot_attention
from .images import PreparedImage, find_images, prepare_images

logger = logging.getLogger(__name__)

DEFAULT_TOP_SLOTS = 16
DEFAULT_ATTRIBUTE_SLOTS = 4
SLOT_MATRIX_FILE = "knn_slot_attributes.json"  # written by eval_knn.py --per_slot --attributes


def _attribute_accuracy(args: argparse.Namespace) -> dict[int, float] | None:
    """Slot -> val top-1 on ``--attribute``, from the slot x attribute matrix; None without ``--attribute``."""
    if args.attribute is None:
        return None
    if args.slots is not None:
        raise UserError("--attribute chooses the slots itself: drop --slots (use --top_slots K for how many)")
    path = args.slot_matrix or os.path.join(os.path.dirname(os.path.abspath(args.pretrained_weights)),
                                            SLOT_MATRIX_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--attribute needs the slot x attribute matrix: {path} not found (run eval_knn.py "
                        f"--per_slot --attributes CSV --attribute_columns ... first, or give --slot_matrix)")
    with open(path) as handle:
        matrix = json.load(handle)
    if args.attribute not in matrix.get("attributes", []):
        raise UserError(f"--attribute {args.attribute} is not in {path} (attributes: "
                        f"{', '.join(matrix.get('attributes', []))})")
    return {row["slot"]: row["top1"][args.attribute] for row in matrix["slots"]}


def _choose_slots(args: argparse.Namespace, scores: torch.Tensor,
                  accuracy: dict[int, float] | None) -> tuple[list[int], str]:
    if args.slots is not None:
        return args.slots, "given by --slots"
    if accuracy is not None:
        count = min(args.top_slots or DEFAULT_ATTRIBUTE_SLOTS, len(accuracy))
        order = sorted(accuracy, key=lambda slot: (-accuracy[slot], slot))[:count]
        return order, f"top {count} of {len(accuracy)} by k-NN top-1 on {args.attribute}"
    count = min(args.top_slots or DEFAULT_TOP_SLOTS, len(scores))
    order = torch.argsort(scores, descending=True, stable=True)[:count]
    return order.tolist(), f"top {count} of {len(scores)} by peakedness"


def _check_slot_request(args: argparse.Namespace, model: torch.nn.Module) -> bool:
    """Whether to draw slots; a request that cannot be met is a :class:`UserError`."""
    asked = args.slots is not None or args.top_slots is not None or args.attribute is not None
    readout = model.readout_module
    if not readout.has_attention_maps:
        if asked:
            raise UserError(f"{args.pretrained_weights} is a {model.readout!r} read-out model with no attention "
                            f"maps; drop --slots/--top_slots to draw the per-head CLS attention only")
        return False
    check_slots(args.slots or [], readout.num_maps)
    return True


def _tile_rows(images: Sequence[PreparedImage], maps: Sequence[torch.Tensor], indices: Sequence[int],
               label: Callable[[int, int], str], tile_height: int, alpha: float) -> list[list[Image.Image]]:
    """One row per index: for each image, its map at that index overlaid and labelled."""
    return [[render.labelled(render.overlay(image.pixels, image_maps[index], tile_height, alpha), label(index, i))
             for i, (image, image_maps) in enumerate(zip(images, maps))]
            for index in indices]


def visualize(args: argparse.Namespace) -> dict[str, Any]:
    """Writes ``slots.png`` (SPARO models), ``heads.png`` and ``summary.json`` to ``args.output_dir``."""
    setup_logging()
    if len(args.image_size) > 2:
        raise UserError(f"--image_size takes one size (shorter side) or two (height width), got "
                        f"{len(args.image_size)} values")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    device = resolve_device(args.device)
    output_dir = Path(args.output_dir)
    ensure_writable_dir(str(output_dir), create=False)  # created once the images are drawn
    paths = find_images(args.images, args.max_images)
    accuracy = _attribute_accuracy(args)
    model, _ = build_pretrained_backbone(args.pretrained_weights, args.checkpoint_key, vars(args))
    model.to(device)
    draw_slots = _check_slot_request(args, model)
    if accuracy is not None and sorted(accuracy) != list(range(model.readout_module.num_maps)):
        raise UserError(f"the slot matrix has {len(accuracy)} slots but this model has "
                        f"{model.readout_module.num_maps}: it belongs to another checkpoint")
    patch_size = model.patch_embed.patch_size[0]
    images = prepare_images(paths, args.image_size, patch_size)

    slot_maps, cls_weights, slot_stats, head_maps = [], [], [], []
    for image in images:
        tensor = image.tensor.to(device)
        grid_size = (tensor.shape[-2] // patch_size, tensor.shape[-1] // patch_size)
        head_maps.append(patch_grid(head_cls_attention(model, tensor), grid_size, model.num_prefix_tokens))
        if draw_slots:
            attention = slot_attention(model, tensor)
            slot_maps.append(patch_grid(attention, grid_size, model.readout_module.num_prefix_tokens))
            cls_weights.append(attention[:, 0])
            slot_stats.append(slot_statistics(attention[None], model.readout_module.num_prefix_tokens))

    output_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "checkpoint": str(args.pretrained_weights),
        "readout": model.readout,
        "images": [str(image.path) for image in images],
        "input_sizes": [list(image.pixels.size[::-1]) for image in images],
        "patch_size": patch_size,
        "files": [],
    }
    if draw_slots:
        stats = SlotStatistics.mean(slot_stats)
        scores = stats.peakedness
        chosen, how = _choose_slots(args, scores, accuracy)
        label = model.readout_module.map_label
        known = (lambda slot: f" {accuracy[slot]:.0f}%") if accuracy is not None else (lambda slot: "")
        rows = _tile_rows(images, slot_maps, chosen,
                          lambda slot, i: f"{label} {slot}{known(slot)} cls {cls_weights[i][slot]:.2f}",
                          args.tile_size, args.alpha)
        render.grid(rows).save(output_dir / "slots.png")
        summary["files"].append("slots.png")
        summary["slot_selection"] = how
        summary["peakedness"] = PEAKEDNESS_HELP
        summary["slot_statistics"] = stats.summary()
        summary["slots"] = [{"slot": slot, "peakedness": round(scores[slot].item(), 6),
                             "max_attention": round(stats.max_attention[slot].item(), 6),
                             "cls_weight": [round(weights[slot].item(), 6) for weights in cls_weights]}
                            | ({"top1": accuracy[slot]} if accuracy is not None else {})
                            for slot in chosen]
        if accuracy is not None:
            summary["attribute"] = args.attribute
    num_heads = head_maps[0].shape[0]
    rows = _tile_rows(images, head_maps, list(range(num_heads)), lambda head, i: f"head {head}",
                      args.tile_size, args.alpha)
    render.grid(rows).save(output_dir / "heads.png")
    summary["files"].append("heads.png")
    write_json_atomic(summary, output_dir / "summary.json")

    columns = f"{len(images)} image column(s)"
    if draw_slots:
        logger.info(f"slots.png: slots {', '.join(map(str, chosen))} ({how}), {columns}")
    logger.info(f"heads.png: CLS attention of the {num_heads} heads of block {len(model.blocks) - 1}, {columns}")
    logger.info(f"wrote {', '.join(summary['files'])} and summary.json to {output_dir}")
    return summary
