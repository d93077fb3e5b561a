"""The k-NN evaluation run by ``eval_knn.py`` (and at the end of training): sharded feature extraction, k-NN,
per-slot analysis, slot selection and attribute label sets (which slot knows what)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch

from .. import distributed
from ..cli import ensure_writable_dir
from ..data.datasets import ImageDataset, evenly_spaced, labelled_splits, ordered_loader, shard
from ..data.transforms import eval_transform
from ..distributed import DistributedContext, shard_bounds
from ..errors import UserError
from ..models.factory import build_pretrained_backbone
from ..models.readouts import restrict_to_slots
from ..utils.files import write_json_atomic
from ..viz.heatmap import draw_slot_heatmap
from .attributes import AttributeLabels, attribute_labels, majority_chance, parse_columns
from .features import dump_features, extract_dataset_features, load_features
from .flags import check_eval_args
from .knn import sharded_knn, sharded_knn_sweep
from .slot_matrix import attribute_knn, select_for_attribute, selection_table, slot_attribute_matrix, top1_row
from .slot_stats import PEAKEDNESS_HELP, SlotStatistics, measure_slots
from .slots import SlotScore, check_slots, per_slot_knn, select_slots, slot_layout


def evaluate_knn(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation ``args`` describe and returns (on every rank) what it printed, as a dict."""
    _check_args(args)
    context = distributed.init_distributed()
    try:
        return _evaluate(args, context)
    finally:
        distributed.destroy_distributed()


def _check_args(args: argparse.Namespace) -> None:
    wrong = [T for T in args.temperatures if not T > 0]
    if wrong:
        raise UserError(f"--temperature must be positive, got {', '.join(f'{T:g}' for T in wrong)}")
    args.temperature = args.temperatures[0]  # the one of DINO's output lines and of the slot analyses
    if not args.data_path and not args.load_features:
        raise UserError("give --data_path (a folder with train/ and val/) or --load_features")
    if args.slots and args.select_slots:
        raise UserError("--slots and --select_slots exclude each other: the first fixes the slots, the second "
                        "chooses them")
    if not 0 < args.select_holdout < 1:
        raise UserError(f"--select_holdout must be a fraction in (0, 1), got {args.select_holdout}")
    _check_attribute_args(args)
    # checked now, not after the features are extracted
    if args.output_dir is not None or args.per_slot or args.select_slots or args.attributes:
        if args.output_dir is None:  # beside the evaluated checkpoint, never silently in the working directory
            args.output_dir = os.path.dirname(os.path.abspath(args.pretrained_weights))
        ensure_writable_dir(args.output_dir)
    if args.dump_features:
        ensure_writable_dir(args.dump_features, "--dump_features")


def _check_attribute_args(args: argparse.Namespace) -> None:
    if bool(args.attributes) != bool(args.attribute_columns):
        raise UserError("--attributes CSV and --attribute_columns NAMES go together")
    if args.attributes:
        args.attribute_columns = parse_columns(args.attribute_columns)
        if not args.data_path:
            raise UserError("--attributes needs --data_path: the CSV's paths are relative to it (dumped features "
                            "do not record image paths; --load_features may be added to reuse them)")
    if args.select_for and not (args.select_slots and args.attributes):
        raise UserError("--select_for ATTR needs --select_slots K and --attributes")
    if args.select_for and args.select_for not in args.attribute_columns:
        raise UserError(f"--select_for {args.select_for} is not one of --attribute_columns "
                        f"{','.join(args.attribute_columns)}")
    if args.compare_weights and not (args.per_slot and args.attributes):
        raise UserError("--compare_weights adds a row to the slot x attribute matrix: it needs --per_slot and "
                        "--attributes")
    if args.compare_weights and not os.path.isfile(args.compare_weights):
        raise UserError(f"--compare_weights {args.compare_weights} not found")


def _evaluate(args: argparse.Namespace, context: DistributedContext) -> dict[str, Any]:
    log: Callable[..., None] = print if context.is_main else (lambda *a, **k: None)
    label_sets = _attribute_label_sets(args) if args.attributes else None  # before any expensive work
    model, config = build_pretrained_backbone(args.pretrained_weights, args.checkpoint_key, vars(args),
                                              verbose=context.is_main)
    model.to(context.device)
    check_eval_args(args, config)
    slots = check_slots(args.slots, slot_layout(model, "--slots")[0]) if args.slots else None
    if args.per_slot or args.select_slots:
        num_slots, slot_dim = slot_layout(model, "--per_slot" if args.per_slot else "--select_slots")

    train_features, train_labels, test_features, test_labels, num_classes = _features(args, context, model)
    if train_features.shape[1] != model.feature_dim and (args.slots or args.per_slot or args.select_slots):
        raise UserError(f"the features have {train_features.shape[1]} dimensions but the model's encoding "
                        f"has {model.feature_dim}: slots cannot be located")
    store = context.device if args.use_cuda else torch.device("cpu")
    train_features, test_features = train_features.to(store), test_features.to(store)
    train_labels, test_labels = train_labels.to(store), test_labels.to(store)
    results: dict[str, Any] = {"num_classes": num_classes, "temperature": args.temperature}

    train_view, test_view = train_features, test_features
    if slots is not None:
        num_slots, slot_dim = slot_layout(model, "--slots")
        train_view = restrict_to_slots(train_features, slots, slot_dim)
        test_view = restrict_to_slots(test_features, slots, slot_dim)
        results["slots"] = slots
        log(f"evaluating slots {','.join(map(str, slots))} of {num_slots}")
    sweep = sharded_knn_sweep(train_view, train_labels, test_view, test_labels, args.nb_knn, args.temperatures,
                              num_classes)
    for (k, T), (top1, top5) in sweep.items():
        log(f"{k}-NN classifier result{'' if T == args.temperature else f' (T={T:g})'}: Top1: {top1}, Top5: {top5}")
    results["knn"] = {str(k): {"top1": top1, "top5": top5} for (k, T), (top1, top5) in sweep.items()
                      if T == args.temperature}
    results["knn_sweep"] = [{"k": k, "temperature": T, "top1": top1, "top5": top5}
                            for (k, T), (top1, top5) in sweep.items()]
    if args.output_dir:
        _write_json(context, args.output_dir, "knn.json", {
            "num_classes": num_classes, "train_images": int(sum(distributed.all_gather_sizes(len(train_features)))),
            "val_images": int(sum(distributed.all_gather_sizes(len(test_features)))), "sweep": results["knn_sweep"],
            **({"slots": slots} if slots is not None else {})}, log)

    if args.per_slot:
        scores = per_slot_knn(train_features, train_labels, test_features, test_labels, num_slots, slot_dim,
                              args.slot_knn, args.temperature, num_classes)
        log(f"per-slot {args.slot_knn}-NN accuracy on val, best first:\n{_slot_table(scores)}")
        results["per_slot"] = {"k": args.slot_knn, "split": "val", "slots": [vars(s) for s in scores]}
        if args.data_path:
            stats = _slot_statistics(model, args, context.device)
            log(f"slot statistics on {stats.images} val images: " + ", ".join(
                f"{name} {value:.3f}" for name, value in stats.summary().items()) + f" ({PEAKEDNESS_HELP})")
            results["per_slot"]["statistics"] = {"images": stats.images, **stats.summary()}
            by_slot = {row["slot"]: row for row in stats.per_slot()}
            for row in results["per_slot"]["slots"]:
                row.update(by_slot[row["slot"]])
        _write_json(context, args.output_dir, "knn_per_slot.json", results["per_slot"], log)

    if args.select_slots and not args.select_for:  # --select_for chooses by an attribute instead, below
        results["selection"] = _select(args, train_features, train_labels, test_features, test_labels,
                                       num_slots, slot_dim, num_classes, log)
        _write_json(context, args.output_dir, "knn_slot_selection.json", results["selection"], log)
    if label_sets is not None:
        results.update(_evaluate_attributes(args, context, log, model, label_sets, train_features, test_features,
                                            train_view, test_view))
    return results


def _attribute_label_sets(args: argparse.Namespace) -> list[AttributeLabels]:
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


def _evaluate_attributes(args: argparse.Namespace, context: DistributedContext, log: Callable[..., None],
                         model: torch.nn.Module, label_sets: list[AttributeLabels], train_features: torch.Tensor,
                         test_features: torch.Tensor, train_view: torch.Tensor, test_view: torch.Tensor
                         ) -> dict[str, Any]:
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
        log(f"attribute {name} ({len(scores['classes'])} labels, chance {scores['chance']:.1f}): " + ", ".join(
            f"{k}-NN top-1 {value['top1']:.2f}" for k, value in scores["knn"].items()))
    _write_json(context, args.output_dir, "knn_attributes.json", results["attributes"], log)
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
        log(f"slot x attribute {args.slot_knn}-NN top-1 on val (n = {matrix.val_images}), slots grouped by their "
            f"best attribute:\n{matrix.table()}")
        correlation = matrix.mean_rank_correlation()
        log("specialisation (best slot - median slot, points): " + ", ".join(
            f"{name} {value:.1f}" for name, value in matrix.specialisation().items())
            + "; mean rank correlation between attributes across slots: "
            + ("undefined" if correlation is None else f"{correlation:.2f}")
            + " (0 = slots specialise differently, 1 = the same slots are best at everything)")
        results["slot_attributes"] = matrix.to_json()
        _write_json(context, args.output_dir, "knn_slot_attributes.json", results["slot_attributes"], log)
        if context.is_main:
            path = os.path.join(args.output_dir, "knn_slot_attributes.png")
            title = os.path.join(*os.path.abspath(args.pretrained_weights).split(os.sep)[-2:])
            draw_slot_heatmap(matrix, title).save(path)
            log(f"written {path}")
    if args.select_for:
        selection = select_for_attribute(train_features, test_features, own, args.select_for, args.select_slots,
                                         num_slots, slot_dim, args.slot_knn, args.nb_knn, args.temperature,
                                         args.select_holdout, args.seed)
        log(f"{args.select_slots} slots chosen for {args.select_for} on {selection['holdout_size']} held-out train "
            f"images (val labels not used): {','.join(map(str, selection['selected']))}; val top-1 "
            f"(n = {selection['val_images']}) of those slots against all slots:\n{selection_table(selection)}")
        results["selection_for"] = selection
        _write_json(context, args.output_dir, f"knn_slot_selection_for_{args.select_for}.json", selection, log)
    return results


def folder_features(model: torch.nn.Module, data_path: str, resize_size: int, crop_size: int, batch_size: int,
                    num_workers: int, context: DistributedContext
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """This rank's shards of the L2-normalised features and labels of ``data_path/train`` and ``data_path/val``
    (DINO's evaluation view), and the number of classes; every rank extracts its own contiguous shard."""
    transform = eval_transform(resize_size, crop_size)
    train_set, val_set = labelled_splits(data_path, transform, transform)
    num_classes = len(train_set.classes)
    log_main(context, f"data: {len(train_set)} train and {len(val_set)} val images, {num_classes} classes; "
                      f"{context.world_size} process(es), each extracting its own shard of both")

    def extract(dataset):
        return extract_dataset_features(model, shard(dataset, context.rank, context.world_size), model.feature_dim,
                                        batch_size, num_workers, context.device)

    return (*extract(train_set), *extract(val_set), num_classes)


def knn_on_folders(model: torch.nn.Module, data_path: str, resize_size: int, crop_size: int, ks: list[int],
                   temperature: float, batch_size: int, num_workers: int, context: DistributedContext
                   ) -> dict[int, tuple[float, float]]:
    """k-NN top-1/top-5 (percent) of ``model``'s features of ``data_path/val`` against ``data_path/train``, as
    ``eval_knn.py`` computes them; a collective when a process group exists (every rank must call it)."""
    train_features, train_labels, test_features, test_labels, num_classes = folder_features(
        model, data_path, resize_size, crop_size, batch_size, num_workers, context)
    return sharded_knn(train_features, train_labels, test_features, test_labels, ks, temperature, num_classes)


def _features(args: argparse.Namespace, context: DistributedContext, model: torch.nn.Module):
    """This rank's shards of train and val features and labels, and the number of classes."""
    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        log_main(context, f"loaded {len(train_features)} train and {len(test_features)} test features from "
                          f"{args.load_features}")
        return (*_own_rows(train_features, train_labels, context), *_own_rows(test_features, test_labels, context),
                num_classes)
    features = folder_features(model, args.data_path, args.resize_size, args.crop_size, args.batch_size_per_gpu,
                               args.num_workers, context)
    if args.dump_features:
        train_features, train_labels, test_features, test_labels, _ = features
        gathered = [distributed.all_gather_rows(t).cpu()
                    for t in (train_features, test_features, train_labels, test_labels)]
        if context.is_main:
            dump_features(args.dump_features, *gathered)
            print(f"features written to {args.dump_features}", flush=True)
    return features


def _slot_statistics(model: torch.nn.Module, args: argparse.Namespace, device: torch.device,
                     count: int = 256) -> SlotStatistics:
    """The slot statistics on up to ``count`` val images, evenly spaced over the set."""
    val = ImageDataset(os.path.join(args.data_path, "val"), eval_transform(args.resize_size, args.crop_size))
    loader = ordered_loader(evenly_spaced(val, count), args.batch_size_per_gpu, args.num_workers)
    return measure_slots(model, (images for images, _ in loader), device)


def _own_rows(features: torch.Tensor, labels: torch.Tensor, context: DistributedContext):
    start, end = shard_bounds(len(features), context.rank, context.world_size)
    return features[start:end], labels[start:end]


def _select(args, train_features, train_labels, test_features, test_labels, num_slots, slot_dim, num_classes,
            log) -> dict[str, Any]:
    selection = select_slots(train_features, train_labels, args.select_slots, num_slots, slot_dim, args.slot_knn,
                             args.temperature, num_classes, args.select_holdout, args.seed)
    log(f"slot selection on a held-out {selection.holdout_size} train images (seed {args.seed}), "
        f"{args.slot_knn}-NN of each slot against the rest of train; val labels are not used:\n"
        f"{_slot_table(selection.holdout_scores[: max(args.select_slots, 10)])}")
    selected = sharded_knn(restrict_to_slots(train_features, selection.slots, slot_dim), train_labels,
                           restrict_to_slots(test_features, selection.slots, slot_dim), test_labels,
                           args.nb_knn, args.temperature, num_classes)
    every = sharded_knn(train_features, train_labels, test_features, test_labels, args.nb_knn, args.temperature,
                        num_classes)
    log(f"selected slots: {','.join(map(str, selection.slots))}")
    log(f"{'k':>5} {'selected top-1':>15} {'all ' + str(num_slots) + ' slots top-1':>20}")
    for k in args.nb_knn:
        log(f"{k:>5} {selected[k][0]:>15.2f} {every[k][0]:>20.2f}")
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


def _write_json(context: DistributedContext, directory: str, name: str, payload: Any, log) -> None:
    if not context.is_main:
        return
    path = os.path.join(directory, name)
    write_json_atomic(payload, path)
    log(f"written {path}")


def log_main(context: DistributedContext, message: str) -> None:
    if context.is_main:
        print(message, flush=True)
