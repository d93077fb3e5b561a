"""The probes of ``eval_linear.py``: DINO's single linear classifier on frozen features (its eval_linear protocol,
run with ``--lr``) for CLS and SPARO encodings, and the dispatch to the probe grid (:mod:`.probes.train`)."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed
from ..checkpoint import read_checkpoint, restore_state, save_atomic
from ..cli import ensure_writable_dir
from ..data.datasets import labelled_splits, ordered_loader, shard
from ..data.transforms import eval_transform, linear_train_transform
from ..distributed import DistributedContext
from ..errors import UserError
from ..logger import setup_logging
from ..models.backbone import ReadoutBackbone
from ..models.factory import build_pretrained_backbone
from ..utils.files import append_json_line
from .flags import check_eval_args, resolve_num_labels
from .probes.grid import GridScores
from .probes.heads import LinearClassifier
from .probes.inputs import ProbeFeatures, build_probe_inputs
from .probes.train import run_probe_grid

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth.tar"


# Flags of the grid (no --lr), refused beside --lr for the linear probe, which then runs DINO's single classifier.
GRID_FLAGS = ("learning_rates", "val_split", "recipe", "warmup_epochs", "train_augmentation", "feature_sets")
TOKEN_FLAGS = ("probe_queries", "probe_heads", "probe_cls", "probe_registers")  # the attentive probes' only
REFERENCE_EPOCHS = 100  # DINO's eval_linear default


def _flags(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The ``--flags`` among ``names`` given on the command line (their defaults are None)."""
    return [f"--{name}" for name in names if getattr(args, name) is not None]


def check_probe_args(args: argparse.Namespace) -> None:
    """The checks that need neither the model nor the data; each failure is one :class:`UserError`."""
    if args.evaluate and not args.linear_weights:
        raise UserError("--evaluate needs --linear_weights PATH (a checkpoint.pth.tar written by eval_linear.py)")
    if args.val_freq < 1 or (args.epochs is not None and args.epochs < 1):
        raise UserError("--epochs and --val_freq must be >= 1")
    if args.lr is not None and args.learning_rates is not None:
        raise UserError("give --lr (one learning rate) or --learning_rates (a grid), not both")
    if args.learning_rates is not None and not args.learning_rates:
        raise UserError("--learning_rates is empty: give at least one learning rate")
    rates = [args.lr] if args.lr is not None else args.learning_rates or []
    wrong = [rate for rate in rates if not rate > 0]
    if wrong:
        raise UserError(f"learning rates must be positive, got {', '.join(f'{rate:g}' for rate in wrong)}")
    if args.probe == "linear" and args.lr is not None and _flags(args, GRID_FLAGS):
        raise UserError(f"--lr runs DINO's single linear classifier exactly; {', '.join(_flags(args, GRID_FLAGS))} "
                        f"belong to the probe grid: give --learning_rates {args.lr:g} instead of --lr for a grid of "
                        f"one")
    if args.probe == "linear" and _flags(args, TOKEN_FLAGS):
        raise UserError(f"{', '.join(_flags(args, TOKEN_FLAGS))} set the attentive probes (--probe attentive or "
                        f"cross_attention), not the linear probe")
    linear_only = _flags(args, ("n_last_blocks", "feature_sets", "slots")) + (
        ["--avgpool_patchtokens"] if args.avgpool_patchtokens else [])
    if args.probe != "linear" and linear_only:
        raise UserError(f"--probe {args.probe} reads the backbone's tokens; {', '.join(linear_only)} choose the linear "
                        f"probe's features")
    if args.feature_sets is not None and (args.n_last_blocks is not None or args.avgpool_patchtokens):
        raise UserError("--feature_sets replaces --n_last_blocks and --avgpool_patchtokens: give one or the other")
    if args.feature_sets is not None and not args.feature_sets:
        raise UserError("--feature_sets is empty: give at least one, e.g. 1 4+avgpool")
    if args.probe_queries is not None and args.probe_queries < 1:
        raise UserError(f"--probe_queries (Q) must be >= 1, got {args.probe_queries}")
    if args.probe_heads is not None and (args.probe != "cross_attention" or args.probe_heads < 1):
        raise UserError("--probe_heads sets the heads of --probe cross_attention (>= 1)")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        raise UserError(f"--warmup_epochs must be >= 0, got {args.warmup_epochs}")


def _is_grid_checkpoint(path: str) -> bool:
    checkpoint = read_checkpoint(path)
    return isinstance(checkpoint, dict) and "grid" in checkpoint


def evaluate_linear(args: argparse.Namespace) -> dict[str, Any]:
    """Trains (or with ``--evaluate`` only validates) the probe ``args`` describe; returns the results: DINO's
    single linear classifier with ``--lr`` (and the linear probe), else the probe grid of
    :func:`~dino_sparo.eval.probes.train.run_probe_grid`."""
    check_probe_args(args)
    if args.evaluate:
        grid = _is_grid_checkpoint(args.linear_weights)
        if not grid and args.probe != "linear":
            raise UserError(f"{args.linear_weights} holds a single linear classifier, not a --probe {args.probe} grid")
    else:
        grid = args.probe != "linear" or args.lr is None
        ensure_writable_dir(args.output_dir)
    context = distributed.init_distributed()
    setup_logging(context.rank)
    try:
        return run_probe_grid(args, context) if grid else _run(args, context)
    finally:
        distributed.destroy_distributed()


def _run(args: argparse.Namespace, context: DistributedContext) -> dict[str, Any]:
    backbone, config = build_pretrained_backbone(args.pretrained_weights, args.checkpoint_key, vars(args),
                                                 verbose=context.is_main)
    check_eval_args(args, config)
    features = _probe_features(args, backbone).to(context.device)
    epochs = args.epochs or REFERENCE_EPOCHS
    train_set, val_set = labelled_splits(args.data_path, linear_train_transform(args.crop_size),
                                         eval_transform(args.resize_size, args.crop_size))
    num_labels = resolve_num_labels(args.num_labels, len(train_set.classes))
    logger.info(f"linear probe on {features.describe()}; {len(train_set)} train and {len(val_set)} val images, "
                f"{num_labels} labels, {context.world_size} process(es)")

    torch.manual_seed(args.seed)  # the same classifier initialisation on every rank and every run
    classifier = LinearClassifier(features.feature_dim, num_labels).to(context.device)
    val_loader = ordered_loader(shard(val_set, context.rank, context.world_size), args.batch_size_per_gpu,
                                args.num_workers, pin_memory=context.device.type == "cuda")
    if args.evaluate:
        _load_classifier(classifier, args.linear_weights, features.describe())
        stats = validate(features, classifier, val_loader, context.device)
        logger.info(f"Accuracy of the network on the {len(val_set)} test images: {stats['acc1']:.1f}% "
                    f"(top-5 {stats['acc5']:.1f}%)")
        return {"val": stats}

    ddp_classifier = distributed.wrap_in_ddp(classifier, context)
    lr = args.lr * args.batch_size_per_gpu * context.world_size / 256.0
    optimizer = torch.optim.SGD(classifier.parameters(), lr, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    checkpoint_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    start_epoch, best_acc = _resume(checkpoint_path, classifier, optimizer, scheduler, features.describe())

    sampler = DistributedSampler(train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=args.seed)
    train_loader = DataLoader(train_set, sampler=sampler, batch_size=args.batch_size_per_gpu,
                              num_workers=args.num_workers, pin_memory=context.device.type == "cuda")
    if context.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    history = []
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        # Augmentations depend on (epoch, rank) only, so a resumed run repeats the uninterrupted one.
        torch.manual_seed(args.seed + epoch * context.world_size + context.rank)
        train_stats = train_one_epoch(features, ddp_classifier, optimizer, train_loader, context.device)
        scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}
        message = f"epoch {epoch + 1}/{epochs}: train loss {train_stats['loss']:.4f}, lr {train_stats['lr']:.6f}"
        if epoch % args.val_freq == 0 or epoch == epochs - 1:
            val_stats = validate(features, classifier, val_loader, context.device)
            best_acc = max(best_acc, val_stats["acc1"])
            record.update({f"test_{k}": v for k, v in val_stats.items()})
            message += f"; val acc@1 {val_stats['acc1']:.2f}, acc@5 {val_stats['acc5']:.2f} (best {best_acc:.2f})"
        record["best_acc"] = best_acc
        history.append(record)
        logger.info(message)
        if context.is_main:
            save_atomic({"epoch": epoch + 1, "state_dict": classifier.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_acc": best_acc, "feature_dim": features.feature_dim,
                         "features": features.describe()}, checkpoint_path)
            append_json_line(os.path.join(args.output_dir, "log.txt"), record)
    logger.info(f"Training of the supervised linear classifier on frozen features completed.\n"
                f"Top-1 test accuracy: {best_acc:.1f}")
    return {"best_acc": best_acc, "history": history, "start_epoch": start_epoch, "features": features.describe()}


def _probe_features(args: argparse.Namespace, backbone: ReadoutBackbone) -> ProbeFeatures:
    """The one feature set of ``--n_last_blocks`` and ``--avgpool_patchtokens`` (``--feature_sets`` is refused
    beside ``--lr``)."""
    return build_probe_inputs(args, backbone).sets[0]


def train_one_epoch(features: ProbeFeatures, classifier: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: DataLoader, device: torch.device) -> dict[str, float]:
    """One pass of SGD on the linear layer; returns the mean loss (over this rank's batches) and the lr."""
    classifier.train()
    total_loss, batches = 0.0, 0
    lr = optimizer.param_groups[0]["lr"]
    for images, labels in loader:
        inputs = features(images.to(device, non_blocking=True))
        loss = F.cross_entropy(classifier(inputs), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
        batches += 1
    totals = distributed.all_reduce_sum(torch.tensor([total_loss, float(batches)], dtype=torch.float64))
    return {"loss": float(totals[0] / max(1.0, float(totals[1]))), "lr": lr}


@torch.no_grad()
def validate(features: ProbeFeatures, classifier: nn.Module, loader: DataLoader,
             device: torch.device) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean loss over the whole val set, each rank taking its own shard."""
    classifier.eval()
    scores = GridScores(1)
    for images, labels in loader:
        logits = classifier(features(images.to(device, non_blocking=True)))
        scores.add([logits], labels.to(device, non_blocking=True))
    (result,) = scores.reduce()
    return {"acc1": result.acc1, "acc5": result.acc5, "loss": result.loss}


def _read_linear_checkpoint(path: str, features: str) -> dict[str, Any]:
    """An eval_linear checkpoint (ours or the reference's: ``state_dict`` with ``module.`` prefixes), refused
    when it records other features than ``features``."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not an eval_linear checkpoint (no state_dict)")
    if "grid" in checkpoint:
        raise UserError(f"{path} was written by a probe grid (eval_linear.py without --lr): use another --output_dir "
                        f"for a single classifier")
    trained_on = checkpoint.get("features", features)
    if trained_on != features:
        raise UserError(f"{path} was trained on {trained_on}, not on {features}: use the same feature flags")
    return checkpoint


def _load_classifier(classifier: LinearClassifier, path: str, features: str) -> None:
    restore_state(_read_linear_checkpoint(path, features), path, state_dict=classifier)


def _resume(path: str, classifier: LinearClassifier, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, features: str) -> tuple[int, float]:
    """(first epoch to run, best accuracy so far) from ``path`` if it exists, else (0, 0)."""
    if not os.path.isfile(path):
        return 0, 0.0
    checkpoint = _read_linear_checkpoint(path, features)
    saved_epochs = (checkpoint.get("scheduler") or {}).get("T_max")
    if saved_epochs != scheduler.T_max:
        raise UserError(f"{path} comes from a run of {saved_epochs} epochs: resume it with --epochs "
                        f"{saved_epochs}, or choose another --output_dir")
    restore_state(checkpoint, path, state_dict=classifier, optimizer=optimizer, scheduler=scheduler)
    epoch, best_acc = int(checkpoint.get("epoch", 0)), float(checkpoint.get("best_acc", 0.0))
    logger.info(f"resumed from {path}: epoch {epoch} done, best top-1 so far {best_acc:.2f}")
    return epoch, best_acc
