"""Linear probe on frozen features (DINO's eval_linear protocol) for CLS and SPARO encodings."""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed
from ..checkpoint import read_checkpoint, restore_state, save_atomic
from ..cli import ensure_writable_dir
from ..data.datasets import labelled_splits, ordered_loader, shard
from ..data.transforms import eval_transform, linear_train_transform
from ..distributed import DistributedContext
from ..errors import UserError
from ..models import VisionTransformer
from ..models.factory import build_pretrained_backbone
from ..utils.files import append_json_line
from .flags import check_eval_args
from .slots import check_slots, slot_layout

CHECKPOINT_NAME = "checkpoint.pth.tar"


class LinearClassifier(nn.Module):
    """One linear layer on frozen features: weight N(0, 0.01), zero bias, as DINO's."""

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))


class ProbeFeatures(nn.Module):
    """The frozen features the linear probe sees: the read-out's own part
    (:meth:`~dino_sparo.models.readouts.Readout.probe_features`: nothing for CLS, SPARO's encoding or the chosen
    ``slots`` of it at unit RMS per dimension, GAP's patch mean, ...), then the CLS tokens of the last
    ``n_last_blocks`` blocks (each through the final norm, DINO's protocol), and with ``avgpool_patchtokens`` the
    mean of the last block's patch tokens. With one CLS token, CLS and mean are interleaved dimension by dimension
    (``[c0, m0, c1, m1, ...]``) as DINO's eval_linear lays them out, so its trained linear weights evaluate
    correctly; with more blocks (which DINO cannot combine with the mean) the mean is appended.
    """

    def __init__(self, backbone: VisionTransformer, n_last_blocks: int, avgpool_patchtokens: bool,
                 slots: list[int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_last_blocks = n_last_blocks
        self.avgpool_patchtokens = avgpool_patchtokens
        self.slots = slots
        self.eval()
        with torch.no_grad():  # the read-out's share of the features, measured on a one-patch image
            probe = backbone.cls_token.new_zeros(1, 3, *backbone.patch_embed.patch_size)
            own = backbone.readout_module.probe_features(backbone.readout_tokens(backbone.tokens(probe)), slots)
        self.readout_dim = 0 if own is None else own.shape[1]
        self.feature_dim = self.readout_dim + backbone.embed_dim * (n_last_blocks + int(avgpool_patchtokens))

    def describe(self) -> str:
        parts = []
        if self.readout_dim:
            slots = f" slots {','.join(map(str, self.slots))}" if self.slots is not None else ""
            parts.append(f"{self.backbone.readout.upper()} read-out{slots}")
        if self.n_last_blocks:
            parts.append(f"CLS tokens of the last {self.n_last_blocks} block(s)")
        if self.avgpool_patchtokens:
            parts.append("mean of the last block's patch tokens")
        return " + ".join(parts) + f" ({self.feature_dim} dims)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.get_intermediate_layers(images, max(1, self.n_last_blocks))
        own = self.backbone.readout_module.probe_features(self.backbone.readout_tokens(tokens[-1]), self.slots)
        features = [] if own is None else [own]
        cls_tokens = [t[:, 0] for t in tokens[-self.n_last_blocks:]] if self.n_last_blocks else []
        if self.avgpool_patchtokens:
            patch_mean = tokens[-1][:, self.backbone.num_prefix_tokens:].mean(dim=1)
            if len(cls_tokens) == 1:
                cls_tokens = [torch.stack((cls_tokens[0], patch_mean), dim=-1).flatten(1)]
            else:
                cls_tokens.append(patch_mean)
        return torch.cat(features + cls_tokens, dim=-1).float()


def evaluate_linear(args: argparse.Namespace) -> dict[str, Any]:
    """Trains (or with ``--evaluate`` only validates) the linear probe ``args`` describe; returns the results."""
    if args.evaluate and not args.linear_weights:
        raise UserError("--evaluate needs --linear_weights PATH (a checkpoint.pth.tar written by eval_linear.py)")
    if args.val_freq < 1 or args.epochs < 1:
        raise UserError("--epochs and --val_freq must be >= 1")
    if not args.evaluate:
        ensure_writable_dir(args.output_dir)
    context = distributed.init_distributed()
    try:
        return _run(args, context)
    finally:
        distributed.destroy_distributed()


def _run(args: argparse.Namespace, context: DistributedContext) -> dict[str, Any]:
    log = print if context.is_main else (lambda *a, **k: None)
    backbone, config = build_pretrained_backbone(args.pretrained_weights, args.checkpoint_key, vars(args),
                                                 verbose=context.is_main)
    check_eval_args(args, config)
    features = _probe_features(args, backbone).to(context.device)
    train_set, val_set = labelled_splits(args.data_path, linear_train_transform(args.crop_size),
                                         eval_transform(args.resize_size, args.crop_size))
    num_labels = args.num_labels if args.num_labels is not None else len(train_set.classes)
    if num_labels < len(train_set.classes):
        raise UserError(f"--num_labels {num_labels} is smaller than the {len(train_set.classes)} classes of train/")
    log(f"linear probe on {features.describe()}; {len(train_set)} train and {len(val_set)} val images, "
        f"{num_labels} labels, {context.world_size} process(es)")

    torch.manual_seed(args.seed)  # the same classifier initialisation on every rank and every run
    classifier = LinearClassifier(features.feature_dim, num_labels).to(context.device)
    val_loader = ordered_loader(shard(val_set, context.rank, context.world_size), args.batch_size_per_gpu,
                                args.num_workers, pin_memory=context.device.type == "cuda")
    if args.evaluate:
        _load_classifier(classifier, args.linear_weights, features.describe())
        stats = validate(features, classifier, val_loader, context.device)
        log(f"Accuracy of the network on the {len(val_set)} test images: {stats['acc1']:.1f}% "
            f"(top-5 {stats['acc5']:.1f}%)")
        return {"val": stats}

    ddp_classifier = classifier
    if distributed.is_dist_initialized():
        ddp_classifier = DistributedDataParallel(
            classifier, device_ids=[context.device.index] if context.device.type == "cuda" else None)
    lr = args.lr * args.batch_size_per_gpu * context.world_size / 256.0
    optimizer = torch.optim.SGD(classifier.parameters(), lr, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    checkpoint_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    start_epoch, best_acc = _resume(checkpoint_path, classifier, optimizer, scheduler, features.describe(), log)

    sampler = DistributedSampler(train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=args.seed)
    train_loader = DataLoader(train_set, sampler=sampler, batch_size=args.batch_size_per_gpu,
                              num_workers=args.num_workers, pin_memory=context.device.type == "cuda")
    if context.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    history = []
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        # Augmentations depend on (epoch, rank) only, so a resumed run repeats the uninterrupted one.
        torch.manual_seed(args.seed + epoch * context.world_size + context.rank)
        train_stats = train_one_epoch(features, ddp_classifier, optimizer, train_loader, context.device)
        scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}
        message = f"epoch {epoch + 1}/{args.epochs}: train loss {train_stats['loss']:.4f}, lr {train_stats['lr']:.6f}"
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            val_stats = validate(features, classifier, val_loader, context.device)
            best_acc = max(best_acc, val_stats["acc1"])
            record.update({f"test_{k}": v for k, v in val_stats.items()})
            message += f"; val acc@1 {val_stats['acc1']:.2f}, acc@5 {val_stats['acc5']:.2f} (best {best_acc:.2f})"
        record["best_acc"] = best_acc
        history.append(record)
        log(message, flush=True)
        if context.is_main:
            save_atomic({"epoch": epoch + 1, "state_dict": classifier.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_acc": best_acc, "feature_dim": features.feature_dim,
                         "features": features.describe()}, checkpoint_path)
            append_json_line(os.path.join(args.output_dir, "log.txt"), record)
    log(f"Training of the supervised linear classifier on frozen features completed.\n"
        f"Top-1 test accuracy: {best_acc:.1f}")
    return {"best_acc": best_acc, "history": history, "start_epoch": start_epoch, "features": features.describe()}


def _probe_features(args: argparse.Namespace, backbone: VisionTransformer) -> ProbeFeatures:
    default_blocks = min(backbone.readout_module.probe_cls_blocks, len(backbone.blocks))
    n_last_blocks = args.n_last_blocks if args.n_last_blocks is not None else default_blocks
    if not 0 <= n_last_blocks <= len(backbone.blocks):
        raise UserError(f"--n_last_blocks must be between 0 and the {len(backbone.blocks)} remaining blocks, "
                        f"got {n_last_blocks}")
    slots = check_slots(args.slots, slot_layout(backbone, "--slots")[0]) if args.slots else None
    features = ProbeFeatures(backbone, n_last_blocks, args.avgpool_patchtokens, slots)
    if features.feature_dim == 0:
        raise UserError(f"--n_last_blocks 0 leaves the {backbone.readout.upper()} read-out without features: "
                        f"use >= 1")
    return features


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
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    for images, labels in loader:
        labels = labels.to(device, non_blocking=True)
        logits = classifier(features(images.to(device, non_blocking=True)))
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.view(-1, 1)
        sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                              ranked[:, 0].sum().item(), ranked.any(dim=1).sum().item(), labels.numel()],
                             dtype=torch.float64)
    sums = distributed.all_reduce_sum(sums)
    count = max(1.0, float(sums[3]))
    return {"acc1": float(100 * sums[1] / count), "acc5": float(100 * sums[2] / count),
            "loss": float(sums[0] / count)}


def _read_linear_checkpoint(path: str, features: str) -> dict[str, Any]:
    """An eval_linear checkpoint (ours or the reference's: ``state_dict`` with ``module.`` prefixes), refused
    when it records other features than ``features``."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not an eval_linear checkpoint (no state_dict)")
    trained_on = checkpoint.get("features", features)
    if trained_on != features:
        raise UserError(f"{path} was trained on {trained_on}, not on {features}: use the same feature flags")
    return checkpoint


def _load_classifier(classifier: LinearClassifier, path: str, features: str) -> None:
    restore_state(_read_linear_checkpoint(path, features), path, state_dict=classifier)


def _resume(path: str, classifier: LinearClassifier, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, features: str, log) -> tuple[int, float]:
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
    log(f"resumed from {path}: epoch {epoch} done, best top-1 so far {best_acc:.2f}", flush=True)
    return epoch, best_acc
