"""The probe grid run by ``eval_linear.py`` unless ``--lr`` asks for DINO's single linear classifier: heads of one
probe (linear, Efficient Probing or the cross-attention pooler) over a grid of learning rates (and, for the linear
probe, of feature sets) trained at once on the frozen inputs of each batch, the one reported chosen on a held-out
part of the training images, never on val."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Subset

from ... import distributed
from ...checkpoint import read_checkpoint, restore_state, save_atomic
from ...data.datasets import ImageDataset, labelled_splits, ordered_loader, shard
from ...data.transforms import eval_transform, linear_train_transform
from ...distributed import DistributedContext
from ...errors import UserError
from ...models.factory import build_pretrained_backbone
from ...utils.files import append_json_line, write_json_atomic
from ..flags import check_eval_args, resolve_num_labels
from .batches import Batch, CachedBatches, ImageBatches
from .cache import cached_inputs, extract_inputs, image_set_digest
from .grid import GridPoint, GridScores, ProbeGrid, Scores, choose, grid_loss
from .heads import build_head
from .holdout import holdout_size, split_holdout
from .inputs import LinearInputs, ProbeTokens, build_probe_inputs
from .recipes import RECIPES, Recipe, build_optimizer, default_recipe, lr_factor

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth.tar"
RESULTS_NAME = "probe_results.json"
CACHE_FOLDER = "feature_cache"
DEFAULT_VAL_SPLIT = 0.1
# What a checkpoint's grid must share with the flags to be evaluated: the shapes of its heads.
HEAD_SETTINGS = ("probe", "inputs", "learning_rates", "num_labels", "probe_queries", "probe_heads")


@dataclass
class GridRun:
    """What a probe-grid run trains, on what, and how (see :func:`run_probe_grid`)."""
    inputs: LinearInputs | ProbeTokens
    config: dict[str, Any]
    recipe: Recipe
    epochs: int
    warmup: int
    train_all: ImageDataset  # train/ through the training view
    val_set: ImageDataset
    view: Callable  # the evaluation view
    points: list[GridPoint]
    grid: ProbeGrid
    optimizer: torch.optim.Optimizer
    lr_scale: float  # total batch / 256, DINO's linear scaling of the learning rates
    settings: dict[str, Any]  # saved with the checkpoint; a resumed run must have the same


def run_probe_grid(args: argparse.Namespace, context: DistributedContext) -> dict[str, Any]:
    """Trains (or with ``--evaluate`` validates) the grid ``args`` describe; returns the results on every rank."""
    run = _build(args, context)
    if args.evaluate:
        return _evaluate(args, context, run)
    train_set, evaluation_sets = _split(args, run)
    holdout = run.settings["holdout"]
    logger.info(
        f"{args.probe} probe on {'; '.join(run.inputs.describe())}: {len(run.points)} classifier(s) "
        f"({len(run.inputs.dims)} input set(s) x {len(run.settings['learning_rates'])} learning rate(s)), "
        f"recipe {run.recipe.name} ({run.recipe.optimizer}, {run.epochs} epochs, {run.warmup} warm-up); "
        f"{len(train_set)} train, {holdout['images']} held-out (--val_split {holdout['val_split']:g}, "
        f"seed {args.seed}) and {len(run.val_set)} val images, {run.settings['num_labels']} labels, "
        f"{context.world_size} process(es)")
    checkpoint_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    start_epoch, last = _resume(checkpoint_path, run)
    if run.settings["train_augmentation"]:
        batches = ImageBatches(run.inputs, train_set, evaluation_sets, args.batch_size_per_gpu, args.num_workers,
                               context, args.seed)
    else:
        batches = _cached_batches(args, context, run, train_set, evaluation_sets)
    model = distributed.wrap_in_ddp(run.grid, context)
    history = []
    for epoch in range(start_epoch, run.epochs):
        # Augmentations depend on (epoch, rank) only, so a resumed run repeats the uninterrupted one.
        torch.manual_seed(args.seed + epoch * context.world_size + context.rank)
        record: dict[str, Any] = {
            "epoch": epoch, "lr_factor": lr_factor(epoch, run.epochs, run.warmup),
            "train_loss": train_epoch(model, run.grid, run.optimizer, batches, epoch, run.recipe, run.epochs,
                                      run.warmup)}
        message = f"epoch {epoch + 1}/{run.epochs}: train loss {record['train_loss']:.4f} (mean over the grid)"
        if epoch % args.val_freq == 0 or epoch == run.epochs - 1:
            last = {name: score(run.grid, batches.evaluation(name)) for name in evaluation_sets}
            chosen = choose(last["holdout"]) if "holdout" in last else 0
            # best_acc: under DINO's log.txt key, the val top-1 this run reports (of the head chosen on held-out
            # images), so that tools reading DINO's log find the probe's result.
            record.update(grid=_grid_rows(run.points, last, run.lr_scale), chosen=chosen,
                          chosen_lr=run.points[chosen].lr, best_acc=last["val"][chosen].acc1)
            message += f"; chosen on held-out: lr {run.points[chosen].lr:g}" + (
                f" (input set {run.points[chosen].inputs})" if len(run.inputs.dims) > 1 else "") + (
                f", val acc@1 {last['val'][chosen].acc1:.2f}")
        history.append(record)
        logger.info(message)
        if context.is_main:
            save_atomic({"epoch": epoch + 1, "state_dict": run.grid.state_dict(),
                         "optimizer": run.optimizer.state_dict(), "grid": run.settings,
                         "features": "; ".join(run.inputs.describe()), "scores": _scores_state(last),
                         "chosen": record.get("chosen")}, checkpoint_path)
            append_json_line(os.path.join(args.output_dir, "log.txt"), record)
    if last is None:
        raise UserError(f"{checkpoint_path} records no validation to report: run again with another --output_dir")
    results = _report(run, last)
    results.update(history=history, start_epoch=start_epoch)
    if context.is_main:
        write_json_atomic({k: v for k, v in results.items() if k != "history"},
                          os.path.join(args.output_dir, RESULTS_NAME))
    return results


def _build(args: argparse.Namespace, context: DistributedContext) -> GridRun:
    """The frozen backbone and the inputs it gives, the recipe, the data sets, and the grid with its optimiser."""
    backbone, config = build_pretrained_backbone(args.pretrained_weights, args.checkpoint_key, vars(args),
                                                 verbose=context.is_main)
    check_eval_args(args, config)
    inputs = build_probe_inputs(args, backbone).to(context.device)
    recipe = RECIPES[args.recipe or default_recipe(args.probe)]
    epochs = args.epochs or recipe.epochs
    warmup = recipe.warmup_epochs(epochs) if args.warmup_epochs is None else args.warmup_epochs
    if warmup >= epochs and warmup > 0:
        raise UserError(f"--warmup_epochs {warmup} must be below --epochs {epochs}")
    augment = args.train_augmentation is not False
    view = eval_transform(args.resize_size, args.crop_size)
    train_all, val_set = labelled_splits(args.data_path, linear_train_transform(args.crop_size) if augment else view,
                                         view)
    num_labels = resolve_num_labels(args.num_labels, len(train_all.classes))
    learning_rates = [args.lr] if args.lr is not None else list(args.learning_rates or recipe.learning_rates)
    points = [GridPoint(index, lr) for index in range(len(inputs.dims)) for lr in learning_rates]
    grid = ProbeGrid(lambda index: build_head(args.probe, inputs.dims[index], num_labels, args.probe_queries,
                                              args.probe_heads), points, args.seed).to(context.device)
    lr_scale = args.batch_size_per_gpu * context.world_size / 256
    optimizer = build_optimizer(recipe, [{"params": list(head.parameters()), "base_lr": point.lr * lr_scale}
                                         for head, point in zip(grid.heads, points)])
    settings = {"probe": args.probe, "inputs": inputs.describe(), "learning_rates": learning_rates,
                "num_labels": num_labels, "probe_queries": getattr(grid.heads[0], "num_queries", None),
                "probe_heads": getattr(grid.heads[0], "num_heads", None), "recipe": recipe.name, "epochs": epochs,
                "warmup_epochs": warmup, "train_augmentation": augment}
    return GridRun(inputs, config, recipe, epochs, warmup, train_all, val_set, view, points, grid, optimizer,
                   lr_scale, settings)


def _split(args: argparse.Namespace, run: GridRun) -> tuple[Subset, dict[str, Subset | ImageDataset]]:
    """(the training images, {"val": val images, "holdout": held-out training images through the evaluation
    view}); the held-out part is recorded in ``run.settings``."""
    val_split = DEFAULT_VAL_SPLIT if args.val_split is None else args.val_split
    held_count = holdout_size(val_split, len(run.train_all))
    if held_count == 0 and len(run.points) > 1:
        raise UserError(f"--val_split 0 leaves nothing to choose the {len(run.points)} classifiers of the grid on: "
                        f"hold out training images, or train a single classifier")
    kept, held = split_holdout(len(run.train_all), held_count, args.seed)
    holdout_view = copy.copy(run.train_all)
    holdout_view.transform = run.view
    holdout_set = Subset(holdout_view, held)
    run.settings["holdout"] = {"val_split": val_split, "images": held_count, "seed": args.seed,
                               "digest": image_set_digest(holdout_set)}
    return Subset(run.train_all, kept), {"val": run.val_set, **({"holdout": holdout_set} if held_count else {})}


def _cached_batches(args: argparse.Namespace, context: DistributedContext, run: GridRun, train_set: Subset,
                    evaluation_sets: dict[str, Any]) -> CachedBatches:
    """Every set's inputs, from the cache under OUTPUT_DIR/feature_cache when it holds them for these weights,
    inputs and images, else extracted once and cached there."""
    weights = os.path.abspath(args.pretrained_weights)
    stat = os.stat(weights)
    base_key = {"weights": weights, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "checkpoint_key": args.checkpoint_key, "model": json.loads(json.dumps(run.config, default=str)),
                "inputs": run.inputs.describe(), "view": [args.resize_size, args.crop_size]}

    def load(name: str, dataset: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        key = {**base_key, "images": image_set_digest(dataset)}
        return cached_inputs(os.path.join(args.output_dir, CACHE_FOLDER, f"{name}.pth"), key,
                             lambda: extract_inputs(run.inputs, dataset, args.batch_size_per_gpu, args.num_workers,
                                                    context))

    return CachedBatches(load("train", train_set), {name: load(name, dataset)
                                                    for name, dataset in evaluation_sets.items()},
                         args.batch_size_per_gpu, context, args.seed)


def train_epoch(model: torch.nn.Module, grid: ProbeGrid, optimizer: torch.optim.Optimizer,
                batches: ImageBatches | CachedBatches, epoch: int, recipe: Recipe, epochs: int, warmup: int) -> float:
    """One epoch of every head of ``grid`` (``model``: the grid, or its DDP wrapper), each batch's inputs computed
    once for all of them, the learning rates set by the recipe's schedule; returns the mean loss per head."""
    grid.train()
    steps = max(1, batches.steps_per_epoch())
    totals = torch.zeros(2, dtype=torch.float64)
    for step, (batch, labels) in enumerate(batches.train(epoch)):
        factor = lr_factor(epoch + step / steps if recipe.per_iteration else epoch, epochs, warmup)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss = grid_loss(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += torch.tensor([loss.item() / len(grid.heads), 1.0], dtype=torch.float64)
    totals = distributed.all_reduce_sum(totals)
    return float(totals[0] / max(1.0, float(totals[1])))


@torch.no_grad()
def score(grid: ProbeGrid, batches: Iterable[Batch]) -> list[Scores]:
    """Every head's scores over ``batches`` (this process's share of a set), added up over the processes."""
    grid.eval()
    scores = GridScores(len(grid.heads))
    for batch, labels in batches:
        scores.add(grid(batch), labels)
    return scores.reduce()


def _grid_rows(points: list[GridPoint], scores: dict[str, list[Scores]], lr_scale: float) -> list[dict[str, Any]]:
    rows = []
    for index, point in enumerate(points):
        row: dict[str, Any] = {"lr": point.lr, "scaled_lr": point.lr * lr_scale, "inputs": point.inputs}
        for name, per_head in scores.items():
            row.update({f"{name}_acc1": per_head[index].acc1, f"{name}_acc5": per_head[index].acc5,
                        f"{name}_loss": per_head[index].loss})
        rows.append(row)
    return rows


def _scores_state(scores: dict[str, list[Scores]] | None) -> dict[str, list[list[float]]] | None:
    """The last validation's scores in a checkpoint (plain lists), so that a finished run can report again."""
    if scores is None:
        return None
    return {name: [[s.acc1, s.acc5, s.loss, s.images] for s in per_head] for name, per_head in scores.items()}


def _differences(saved: dict[str, Any], settings: dict[str, Any], names: Iterable[str]) -> list[str]:
    """``name saved (now current)`` for each of ``names`` whose saved setting differs from ``settings``'."""
    return [f"{name} {saved.get(name)!r} (now {settings[name]!r})" for name in names
            if saved.get(name) != settings[name]]


def _resume(path: str, run: GridRun) -> tuple[int, dict[str, list[Scores]] | None]:
    """(first epoch to run, the last validation's scores) from ``path`` if it exists, else (0, None)."""
    if not os.path.isfile(path):
        return 0, None
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "grid" not in checkpoint:
        raise UserError(f"{path} was not written by a probe grid (a single classifier's, run with --lr?): use "
                        f"another --output_dir")
    differences = _differences(checkpoint["grid"], run.settings, run.settings)
    if differences:
        raise UserError(f"{path} was written with other settings: {'; '.join(differences)}; run with the same flags "
                        f"to resume it, or choose another --output_dir")
    restore_state(checkpoint, path, state_dict=run.grid, optimizer=run.optimizer)
    scores = checkpoint.get("scores")
    last = None if scores is None else {name: [Scores(*row[:3], int(row[3])) for row in rows]
                                        for name, rows in scores.items()}
    logger.info(f"resumed from {path}: epoch {checkpoint['epoch']} done")
    return int(checkpoint["epoch"]), last


def _evaluate(args: argparse.Namespace, context: DistributedContext, run: GridRun) -> dict[str, Any]:
    """Validates every head of the grid in ``--linear_weights``; reports the one its run chose."""
    checkpoint = read_checkpoint(args.linear_weights)
    grid, val_set = run.grid, run.val_set
    differences = _differences(checkpoint["grid"], run.settings, HEAD_SETTINGS)
    if differences:
        raise UserError(f"{args.linear_weights} holds another grid: {'; '.join(differences)}: use the flags it was "
                        f"trained with")
    restore_state(checkpoint, args.linear_weights, state_dict=grid)
    loader = ordered_loader(shard(val_set, context.rank, context.world_size), args.batch_size_per_gpu,
                            args.num_workers, context.device.type == "cuda")
    val = score(grid, ((run.inputs(images.to(context.device)), labels.to(context.device))
                       for images, labels in loader))
    chosen = checkpoint.get("chosen")
    rows = _grid_rows(grid.points, {"val": val}, run.lr_scale)
    for row in rows:
        logger.info(f"lr {row['lr']:g} (input set {row['inputs']}): val acc@1 {row['val_acc1']:.2f}, "
                    f"acc@5 {row['val_acc5']:.2f}")
    results: dict[str, Any] = {"grid": rows, "chosen": chosen}
    if chosen is not None:
        results["val"] = vars(val[chosen])
        logger.info(f"Accuracy of the classifier chosen on held-out images (lr {grid.points[chosen].lr:g}) on the "
                    f"{len(val_set)} test images: {val[chosen].acc1:.1f}% (top-5 {val[chosen].acc5:.1f}%)")
    return results


def _report(run: GridRun, scores: dict[str, list[Scores]]) -> dict[str, Any]:
    """Prints the grid's table and the chosen head; returns what probe_results.json holds."""
    settings, points, lr_scale, inputs = run.settings, run.points, run.lr_scale, run.inputs.describe()
    holdout = settings["holdout"]
    chosen = choose(scores["holdout"]) if "holdout" in scores else 0
    rows = _grid_rows(points, scores, lr_scale)
    header = f"{'lr':>8} {'x batch/256':>11} {'input set':>9}" + (f" {'held-out@1':>10}" if "holdout" in scores
                                                                 else "") + f" {'val@1':>7} {'val@5':>7}"
    lines = [header]
    for index, row in enumerate(rows):
        line = f"{row['lr']:>8g} {row['scaled_lr']:>11.4g} {row['inputs']:>9}"
        if "holdout" in scores:
            line += f" {row['holdout_acc1']:>10.2f}"
        lines.append(line + f" {row['val_acc1']:>7.2f} {row['val_acc5']:>7.2f}" + ("  <- chosen" if index == chosen
                                                                                     else ""))
    where = (f"on {holdout['images']} held-out training images (--val_split {holdout['val_split']:g}, seed "
             f"{holdout['seed']}); val labels are not used to choose (DINOv2 chooses on val)"
             if "holdout" in scores else "(a single classifier: nothing to choose)")
    logger.info("input sets: " + "; ".join(f"{i}: {text}" for i, text in enumerate(inputs)))
    logger.info("\n".join(lines))
    val = scores["val"][chosen]
    logger.info(f"chosen {where}: lr {points[chosen].lr:g} ({points[chosen].lr * lr_scale:.4g} at the total batch), "
                f"input set {points[chosen].inputs}; val top-1 {val.acc1:.2f}, top-5 {val.acc5:.2f} "
                f"(n = {val.images})")
    rates = sorted({point.lr for point in points})
    at_edge = len(rates) > 1 and points[chosen].lr in (rates[0], rates[-1])
    if at_edge:
        logger.warning(f"warning: the chosen learning rate {points[chosen].lr:g} is the grid's "
                       f"{'smallest' if points[chosen].lr == rates[0] else 'largest'}: a better one may lie beyond "
                       "it; extend --learning_rates that way")
    return {"probe": settings["probe"], "recipe": settings["recipe"], "epochs": settings["epochs"],
            "warmup_epochs": settings["warmup_epochs"], "train_augmentation": settings["train_augmentation"],
            "inputs": inputs, "holdout": holdout, "selection": "held-out training images (not val)",
            "chosen": {**rows[chosen], "index": chosen, "at_grid_edge": at_edge}, "val": vars(val), "grid": rows}
