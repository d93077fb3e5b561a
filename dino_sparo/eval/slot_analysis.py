"""SPARO's slots in the k-NN evaluation (``eval_knn.py --per_slot``, ``--select_slots``, ``--attributes``): the k-NN
of every single slot with its slot statistics, slots chosen on held-out training images, and label sets read from an
attributes CSV (which slot knows what), with the slot x attribute matrix and its heat map."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch

from .. import distributed
from ..data.datasets import ImageDataset, evenly_spaced, labelled_splits, ordered_loader
from ..data.transforms import eval_transform
from ..distributed import DistributedContext, shard_bounds
from ..errors import UserError
from ..models.factory import build_pretrained_backbone
from ..models.readouts import restrict_to_slots
from ..utils.files import write_json_atomic
from ..viz.heatmap import draw_slot_heatmap
from .attributes import AttributeLabels, attribute_labels, majority_chance
from .features import folder_features
from .knn import sharded_knn
from .slot_matrix import attribute_knn, select_for_attribute, selection_table, slot_attribute_matrix, top1_row
from .slot_stats import PEAKEDNESS_HELP, SlotStatistics, measure_slots
from .slots import SlotScore, per_slot_knn, select_slots, slot_layout

logger = logging.getLogger(__name__)


def per_slot_report(args: argparse.Namespace, context: DistributedContext, model: torch.nn.Module,
                    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                    test_labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """``--per_slot``: every slot's k-NN on val, best first, with its slot statistics on val images."""
    num_slots, slot_dim = slot_layout(model, "--per_slot")
    scores = per_slot_knn(train_features, train_labels, test_features, test_labels, num_slots, slot_dim,
                          args.slot_knn, args.temperature, num_classes)
    logger.info(f"per-slot {args.slot_knn}-NN accuracy on val, best first:\n{_slot_table(scores)}")
    report: dict[str, Any] = {"k": args.slot_knn, "split": "val", "slots": [vars(s) for s in scores]}
    if args.data_path:
        stats = _slot_statistics(model, args, context.device)
        logger.info(f"slot statistics on {stats.images} val images: " + ", ".join(
                    f"{name} {value:.3f}" for name, value in stats.summary().items()) + f" ({PEAKEDNESS_HELP})")
        report["statistics"] = {"images": stats.images, **stats.summary()}
        by_slot = {row["slot"]: row for row in stats.per_slot()}
        for row in report["slots"]:
            row.update(by_slot[row["slot"]])
    write_json_report(context, args.output_dir, "knn_per_slot.json", report)
    return report


def selection_report(args: argparse.Namespace, context: DistributedContext, model: torch.nn.Module,
                     train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     test_labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """``--select_slots K``: K slots chosen on held-out training images, against all slots on val."""
    num_slots, slot_dim = slot_layout(model, "--select_slots")
    report = _select(args, train_features, train_labels, test_features, test_labels, num_slots, slot_dim,
                     num_classes)
    write_json_report(context, args.output_dir, "knn_slot_selection.json", report)
    return report


def attribute_label_sets(args: argparse.Namespace) -> list[AttributeLabels]:
    """The label sets of ``--attribute_columns``, in the order of the folder's train and val images."""
    train, val = labelled_splits(args.data_path, None, None)
    return attribute_labels(args.attributes, args.attribute_columns, args.attribute_bins, args.data_path,
                            [path for path, _ in train.samples], [path for path, _ in val.samples])


def _own_label_sets(label_sets: list[AttributeLabels], train_features: torch.Tensor,
                    test_features: torch.Tensor, context: DistributedContext) -> list[AttributeLabels]:
    """This rank's shard of every label set, matching its contiguous shards of the features."""
    sizes = {"train": distributed.all_gather_sizes(len(train_features)),
             "val": distributed.all_gather_sizes(len(test_features))}
    expected = {"train": len(label_sets[0].train_labels), "val": len(label_sets[0].val_labels)}
    if any(sum(sizes[split]) != expected[split] for split in sizes):
        raise UserError(f"the features hold {sum(sizes['train'])} train and {sum(sizes['val'])} val images but "
                        f"--data_path has {expected['train']} and {expected['val']}: they were not extracted from it")
    train_start, train_end = shard_bounds(expected["train"], context.rank, context.world_size)
    val_start, val_end = shard_bounds(expected["val"], context.rank, context.world_size)
    return [AttributeLabels(labels.name, labels.classes, labels.train_labels[train_start:train_end].to(
        train_features.device), labels.val_labels[val_start:val_end].to(test_features.device), labels.bin_edges)
        for labels in label_sets]


def attribute_report(args: argparse.Namespace, context: DistributedContext, model: torch.nn.Module,
                     label_sets: list[AttributeLabels], train_features: torch.Tensor, test_features: torch.Tensor,
                     train_view: torch.Tensor, test_view: torch.Tensor) -> dict[str, Any]:
    """k-NN on every attribute; with ``--per_slot`` the slot x attribute matrix, with ``--select_for`` the
    selection for one attribute read on all of them."""
    chance = {labels.name: majority_chance(labels) for labels in label_sets}
    own = _own_label_sets(label_sets, train_features, test_features, context)
    knn = attribute_knn(train_view, test_view, own, args.nb_knn, args.temperature)
    results: dict[str, Any] = {"attributes": {
        labels.name: {"classes": labels.classes, "bin_edges": labels.bin_edges, "chance": chance[labels.name],
                      "knn": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in knn[labels.name].items()}}
        for labels in label_sets}}
    for name, scores in results["attributes"].items():
        logger.info(f"attribute {name} ({len(scores['classes'])} labels, chance {scores['chance']:.1f}): "
                    + ", ".join(f"{k}-NN top-1 {value['top1']:.2f}" for k, value in scores["knn"].items()))
    write_json_report(context, args.output_dir, "knn_attributes.json", results["attributes"])
    if args.per_slot or args.select_for:
        num_slots, slot_dim = slot_layout(model, "--per_slot" if args.per_slot else "--select_for")
    if args.per_slot:
        matrix = slot_attribute_matrix(train_features, test_features, own, chance, num_slots, slot_dim,
                                       args.slot_knn, args.temperature)
        if args.compare_weights:
            compare, _ = build_pretrained_backbone(args.compare_weights, args.checkpoint_key, {},
                                                   verbose=context.is_main)
            compare.to(context.device)
            compare_train, _, compare_test, _, _ = folder_features(
                compare, args.data_path, args.resize_size, args.crop_size, args.batch_size_per_gpu,
                args.num_workers, context)
            matrix.rows[compare.readout.upper()] = top1_row(compare_train, compare_test, own, args.slot_knn,
                                                            args.temperature)
        logger.info(f"slot x attribute {args.slot_knn}-NN top-1 on val (n = {matrix.val_images}), slots grouped by "
                    f"their best attribute:\n{matrix.table()}")
        correlation = matrix.mean_rank_correlation()
        logger.info("specialisation (best slot - median slot, points): " + ", ".join(
                    f"{name} {value:.1f}" for name, value in matrix.specialisation().items())
                    + "; mean rank correlation between attributes across slots: "
                    + ("undefined" if correlation is None else f"{correlation:.2f}")
                    + " (0 = slots specialise differently, 1 = the same slots are best at everything)")
        results["slot_attributes"] = matrix.to_json()
        write_json_report(context, args.output_dir, "knn_slot_attributes.json", results["slot_attributes"])
        if context.is_main:
            path = os.path.join(args.output_dir, "knn_slot_attributes.png")
            title = os.path.join(*os.path.abspath(args.pretrained_weights).split(os.sep)[-2:])
            draw_slot_heatmap(matrix, title).save(path)
            logger.info(f"written {path}")
    if args.select_for:
        selection = select_for_attribute(train_features, test_features, own, args.select_for, args.select_slots,
                                         num_slots, slot_dim, args.slot_knn, args.nb_knn, args.temperature,
                                         args.select_holdout, args.seed)
        logger.info(f"{args.select_slots} slots chosen for {args.select_for} on {selection['holdout_size']} held-out "
                    f"train images (val labels not used): {','.join(map(str, selection['selected']))}; val top-1 "
                    f"(n = {selection['val_images']}) of those slots against all slots:\n{selection_table(selection)}")
        results["selection_for"] = selection
        write_json_report(context, args.output_dir, f"knn_slot_selection_for_{args.select_for}.json", selection)
    return results


def _slot_statistics(model: torch.nn.Module, args: argparse.Namespace, device: torch.device,
                     count: int = 256) -> SlotStatistics:
    """The slot statistics on up to ``count`` val images, evenly spaced over the set."""
    val = ImageDataset(os.path.join(args.data_path, "val"), eval_transform(args.resize_size, args.crop_size))
    loader = ordered_loader(evenly_spaced(val, count), args.batch_size_per_gpu, args.num_workers)
    return measure_slots(model, (images for images, _ in loader), device)


def _select(args: argparse.Namespace, train_features: torch.Tensor, train_labels: torch.Tensor,
            test_features: torch.Tensor, test_labels: torch.Tensor, num_slots: int, slot_dim: int,
            num_classes: int) -> dict[str, Any]:
    selection = select_slots(train_features, train_labels, args.select_slots, num_slots, slot_dim, args.slot_knn,
                             args.temperature, num_classes, args.select_holdout, args.seed)
    logger.info(f"slot selection on a held-out {selection.holdout_size} train images (seed {args.seed}), "
                f"{args.slot_knn}-NN of each slot against the rest of train; val labels are not used:\n"
                f"{_slot_table(selection.holdout_scores[: max(args.select_slots, 10)])}")
    selected = sharded_knn(restrict_to_slots(train_features, selection.slots, slot_dim), train_labels,
                           restrict_to_slots(test_features, selection.slots, slot_dim), test_labels,
                           args.nb_knn, args.temperature, num_classes)
    every = sharded_knn(train_features, train_labels, test_features, test_labels, args.nb_knn, args.temperature,
                        num_classes)
    logger.info(f"selected slots: {','.join(map(str, selection.slots))}")
    logger.info(f"{'k':>5} {'selected top-1':>15} {'all ' + str(num_slots) + ' slots top-1':>20}")
    for k in args.nb_knn:
        logger.info(f"{k:>5} {selected[k][0]:>15.2f} {every[k][0]:>20.2f}")
    return {
        "selected": selection.slots, "k": args.slot_knn, "holdout_fraction": args.select_holdout,
        "holdout_size": selection.holdout_size, "seed": args.seed,
        "holdout_scores": [vars(s) for s in selection.holdout_scores],
        "val_selected": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in selected.items()},
        "val_all_slots": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in every.items()},
    }


def _slot_table(scores: list[SlotScore]) -> str:
    lines = [f"{'slot':>6} {'top-1':>7} {'top-5':>7}"]
    lines += [f"{s.slot:>6} {s.top1:>7.2f} {s.top5:>7.2f}" for s in scores]
    return "\n".join(lines)


def write_json_report(context: DistributedContext, directory: str, name: str, payload: Any) -> None:
    """``directory/name`` as JSON, written by the main process only."""
    if context.is_main:
        path = os.path.join(directory, name)
        write_json_atomic(payload, path)
        logger.info(f"written {path}")
