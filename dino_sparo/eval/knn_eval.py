"""The k-NN evaluation run by ``eval_knn.py`` (DINO's protocol: sharded feature extraction, the weighted vote over
every (k, T), feature dumps) and at the end of training; SPARO's slot analyses are :mod:`.slot_analysis`."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch

from .. import distributed
from ..cli import ensure_writable_dir
from ..distributed import DistributedContext, shard_bounds
from ..errors import UserError
from ..logger import setup_logging
from ..models.factory import build_pretrained_backbone
from ..models.readouts import restrict_to_slots
from .attributes import parse_columns
from .features import dump_features, folder_features, load_features
from .flags import check_eval_args
from .knn import sharded_knn, sharded_knn_sweep
from .slot_analysis import (
    attribute_label_sets,
    attribute_report,
    per_slot_report,
    selection_report,
    write_json_report,
)
from .slots import check_slots, slot_layout

logger = logging.getLogger(__name__)


def evaluate_knn(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation ``args`` describe and returns (on every rank) what it printed, as a dict."""
    options = _resolve(args)
    context = distributed.init_distributed()
    setup_logging(context.rank)
    try:
        return _evaluate(options, context)
    finally:
        distributed.destroy_distributed()


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with what they leave open decided (the temperature of DINO's output lines and of the slot
    analyses, the output folder, the attribute columns) and checked, before any work; ``args`` is left as it is."""
    wrong = [T for T in args.temperatures if not T > 0]
    if wrong:
        raise UserError(f"--temperature must be positive, got {', '.join(f'{T:g}' for T in wrong)}")
    if not args.data_path and not args.load_features:
        raise UserError("give --data_path (a folder with train/ and val/) or --load_features")
    if args.slots and args.select_slots:
        raise UserError("--slots and --select_slots exclude each other: the first fixes the slots, the second "
                        "chooses them")
    if not 0 < args.select_holdout < 1:
        raise UserError(f"--select_holdout must be a fraction in (0, 1), got {args.select_holdout}")
    output_dir = args.output_dir
    if output_dir is None and (args.per_slot or args.select_slots or args.attributes):
        output_dir = os.path.dirname(os.path.abspath(args.pretrained_weights))  # never silently the working dir
    options = argparse.Namespace(**{**vars(args), "temperature": args.temperatures[0], "output_dir": output_dir,
                                    "attribute_columns": _attribute_columns(args)})
    if output_dir is not None:  # checked now, not after the features are extracted
        ensure_writable_dir(output_dir)
    if args.dump_features:
        ensure_writable_dir(args.dump_features, "--dump_features")
    return options


def _attribute_columns(args: argparse.Namespace) -> list[str] | None:
    if bool(args.attributes) != bool(args.attribute_columns):
        raise UserError("--attributes CSV and --attribute_columns NAMES go together")
    columns = parse_columns(args.attribute_columns) if args.attributes else None
    if args.attributes and not args.data_path:
        raise UserError("--attributes needs --data_path: the CSV's paths are relative to it (dumped features "
                        "do not record image paths; --load_features may be added to reuse them)")
    if args.select_for and not (args.select_slots and args.attributes):
        raise UserError("--select_for ATTR needs --select_slots K and --attributes")
    if args.select_for and args.select_for not in columns:
        raise UserError(f"--select_for {args.select_for} is not one of --attribute_columns {','.join(columns)}")
    if args.compare_weights and not (args.per_slot and args.attributes):
        raise UserError("--compare_weights adds a row to the slot x attribute matrix: it needs --per_slot and "
                        "--attributes")
    if args.compare_weights and not os.path.isfile(args.compare_weights):
        raise UserError(f"--compare_weights {args.compare_weights} not found")
    return columns


def _evaluate(args: argparse.Namespace, context: DistributedContext) -> dict[str, Any]:
    label_sets = attribute_label_sets(args) if args.attributes else None  # before any expensive work
    model, config = build_pretrained_backbone(args.pretrained_weights, args.checkpoint_key, vars(args),
                                              verbose=context.is_main)
    model.to(context.device)
    check_eval_args(args, config)
    slots = None
    if args.slots:
        num_slots, slot_dim = slot_layout(model, "--slots")
        slots = check_slots(args.slots, num_slots)
    if args.per_slot or args.select_slots:
        slot_layout(model, "--per_slot" if args.per_slot else "--select_slots")  # a read-out with slots

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
        train_view = restrict_to_slots(train_features, slots, slot_dim)
        test_view = restrict_to_slots(test_features, slots, slot_dim)
        results["slots"] = slots
        logger.info(f"evaluating slots {','.join(map(str, slots))} of {num_slots}")
    sweep = sharded_knn_sweep(train_view, train_labels, test_view, test_labels, args.nb_knn, args.temperatures,
                              num_classes)
    for (k, T), (top1, top5) in sweep.items():
        suffix = "" if T == args.temperature else f" (T={T:g})"
        logger.info(f"{k}-NN classifier result{suffix}: Top1: {top1}, Top5: {top5}")
    results["knn"] = {str(k): {"top1": top1, "top5": top5} for (k, T), (top1, top5) in sweep.items()
                      if T == args.temperature}
    results["knn_sweep"] = [{"k": k, "temperature": T, "top1": top1, "top5": top5}
                            for (k, T), (top1, top5) in sweep.items()]
    if args.output_dir:
        write_json_report(context, args.output_dir, "knn.json", {
            "num_classes": num_classes, "train_images": int(sum(distributed.all_gather_sizes(len(train_features)))),
            "val_images": int(sum(distributed.all_gather_sizes(len(test_features)))), "sweep": results["knn_sweep"],
            **({"slots": slots} if slots is not None else {})})

    every = (train_features, train_labels, test_features, test_labels, num_classes)
    if args.per_slot:
        results["per_slot"] = per_slot_report(args, context, model, *every)
    if args.select_slots and not args.select_for:  # --select_for chooses by an attribute instead
        results["selection"] = selection_report(args, context, model, *every)
    if label_sets is not None:
        results.update(attribute_report(args, context, model, label_sets, train_features, test_features,
                                        train_view, test_view))
    return results


def knn_on_folders(model: torch.nn.Module, data_path: str, resize_size: int, crop_size: int, ks: list[int],
                   temperature: float, batch_size: int, num_workers: int, context: DistributedContext
                   ) -> dict[int, tuple[float, float]]:
    """k-NN top-1/top-5 (percent) of ``model``'s features of ``data_path/val`` against ``data_path/train``, as
    ``eval_knn.py`` computes them, the features held on ``context``'s device; a collective when a process group
    exists (every rank must call it)."""
    train_features, train_labels, test_features, test_labels, num_classes = folder_features(
        model, data_path, resize_size, crop_size, batch_size, num_workers, context)
    device = context.device
    return sharded_knn(train_features.to(device), train_labels.to(device), test_features.to(device),
                       test_labels.to(device), ks, temperature, num_classes)


def _features(args: argparse.Namespace, context: DistributedContext, model: torch.nn.Module):
    """This rank's shards of train and val features and labels, and the number of classes."""
    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        logger.info(f"loaded {len(train_features)} train and {len(test_features)} test features from "
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
            logger.info(f"features written to {args.dump_features}")
    return features


def _own_rows(features: torch.Tensor, labels: torch.Tensor, context: DistributedContext):
    start, end = shard_bounds(len(features), context.rank, context.world_size)
    return features[start:end], labels[start:end]
