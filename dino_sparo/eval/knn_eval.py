"""The k-NN evaluation run by ``eval_knn.py``: sharded feature extraction, k-NN, per-slot analysis, selection."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import torch

from ..cli import UserError
from . import distributed
from .data import labelled_splits, shard
from .distributed import DistContext, shard_bounds
from .features import dump_features, eval_transform, extract_dataset_features, load_features
from .knn import sharded_knn
from .pretrained import check_eval_args, load_frozen_backbone
from .slots import SlotScore, parse_slots, per_slot_knn, restrict_to_slots, select_slots, slot_layout


def evaluate_knn(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation ``args`` describe and returns (on every rank) what it printed, as a dict."""
    _check_args(args)
    context = distributed.init_distributed()
    try:
        return _evaluate(args, context)
    finally:
        distributed.destroy()


def _check_args(args: argparse.Namespace) -> None:
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if not args.data_path and not args.load_features:
        raise UserError("give --data_path (a folder with train/ and val/) or --load_features")
    if args.slots and args.select_slots:
        raise UserError("--slots and --select_slots exclude each other: the first fixes the slots, the second "
                        "chooses them")
    if not 0 < args.select_holdout < 1:
        raise UserError(f"--select_holdout must be a fraction in (0, 1), got {args.select_holdout}")


def _evaluate(args: argparse.Namespace, context: DistContext) -> dict[str, Any]:
    log: Callable[..., None] = print if context.is_main else (lambda *a, **k: None)
    model, config = load_frozen_backbone(args, log=context.is_main)
    check_eval_args(args, config)
    slots = parse_slots(args.slots, slot_layout(config, "--slots")[0]) if args.slots else None
    if args.per_slot or args.select_slots:
        slot_layout(config, "--per_slot" if args.per_slot else "--select_slots")

    train_features, train_labels, test_features, test_labels, num_classes = _features(args, context, model)
    if train_features.shape[1] != model.feature_dim and (args.slots or args.per_slot or args.select_slots):
        raise UserError(f"the features have {train_features.shape[1]} dimensions but the model's encoding "
                        f"has {model.feature_dim}: slots cannot be located")
    store = context.device if args.use_cuda else torch.device("cpu")
    train_features, test_features = train_features.to(store), test_features.to(store)
    train_labels, test_labels = train_labels.to(store), test_labels.to(store)
    results: dict[str, Any] = {"num_classes": num_classes, "temperature": args.temperature}

    num_slots, slot_dim = (config["sparo_slots"], config["sparo_slot_dim"])
    train_view, test_view = train_features, test_features
    if slots is not None:
        train_view = restrict_to_slots(train_features, slots, slot_dim)
        test_view = restrict_to_slots(test_features, slots, slot_dim)
        results["slots"] = slots
        log(f"evaluating slots {','.join(map(str, slots))} of {num_slots}")
    knn = sharded_knn(train_view, train_labels, test_view, test_labels, args.nb_knn, args.temperature, num_classes)
    for k, (top1, top5) in knn.items():
        log(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    results["knn"] = {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in knn.items()}

    if args.per_slot:
        scores = per_slot_knn(train_features, train_labels, test_features, test_labels, num_slots, slot_dim,
                              args.slot_knn, args.temperature, num_classes)
        log(f"per-slot {args.slot_knn}-NN accuracy on val, best first:\n{_slot_table(scores)}")
        results["per_slot"] = {"k": args.slot_knn, "split": "val", "slots": [vars(s) for s in scores]}
        _write_json(context, args.output_dir, "knn_per_slot.json", results["per_slot"], log)

    if args.select_slots:
        results["selection"] = _select(args, train_features, train_labels, test_features, test_labels,
                                       num_slots, slot_dim, num_classes, log)
        _write_json(context, args.output_dir, "knn_slot_selection.json", results["selection"], log)
    return results


def _features(args: argparse.Namespace, context: DistContext, model: torch.nn.Module):
    """This rank's shards of train and val features and labels, and the number of classes."""
    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        log_main(context, f"loaded {len(train_features)} train and {len(test_features)} test features from "
                          f"{args.load_features}")
        return (*_own_rows(train_features, train_labels, context), *_own_rows(test_features, test_labels, context),
                num_classes)
    transform = eval_transform(args.resize_size, args.crop_size)
    train_set, val_set = labelled_splits(args.data_path, transform, transform)
    num_classes = len(train_set.classes)
    log_main(context, f"data: {len(train_set)} train and {len(val_set)} val images, {num_classes} classes; "
                      f"{context.world_size} process(es), each extracting its own shard of both")
    extract = lambda dataset: extract_dataset_features(  # noqa: E731
        model, shard(dataset, context.rank, context.world_size), model.feature_dim, args.batch_size_per_gpu,
        args.num_workers, context.device)
    train_features, train_labels = extract(train_set)
    test_features, test_labels = extract(val_set)
    if args.dump_features:
        gathered = [distributed.all_gather_rows(t).cpu()
                    for t in (train_features, test_features, train_labels, test_labels)]
        if context.is_main:
            dump_features(args.dump_features, *gathered)
            print(f"features written to {args.dump_features}", flush=True)
    return train_features, train_labels, test_features, test_labels, num_classes


def _own_rows(features: torch.Tensor, labels: torch.Tensor, context: DistContext):
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


def _write_json(context: DistContext, directory: str, name: str, payload: Any, log) -> None:
    if not context.is_main:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(path + ".tmp", path)
    log(f"written {path}")


def log_main(context: DistContext, message: str) -> None:
    if context.is_main:
        print(message, flush=True)
