"""Frozen probe inputs of a whole image set, extracted once (each process its own shard, then gathered) and cached
on disk, for views that do not change from epoch to epoch: a probe trained for 90 epochs then runs the backbone
once per image, and a resumed run not at all."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ... import distributed
from ...checkpoint import read_checkpoint, save_atomic
from ...data.datasets import ordered_loader, shard
from ...distributed import DistributedContext

logger = logging.getLogger(__name__)


def image_set_digest(dataset: Dataset) -> str:
    """A digest of the images (paths and labels, in order) of an :class:`~dino_sparo.data.datasets.ImageDataset`
    or a ``Subset`` of one, so that a cache of another set of images is never taken for this one's."""
    indices = getattr(dataset, "indices", None)
    base = dataset.dataset if indices is not None else dataset
    samples = [base.samples[i] for i in indices] if indices is not None else base.samples
    return hashlib.sha1("\n".join(f"{path}\t{label}" for path, label in samples).encode()).hexdigest()


@torch.no_grad()
def extract_inputs(inputs: nn.Module, dataset: Dataset, batch_size: int, num_workers: int,
                   context: DistributedContext) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``inputs(images)`` (a list of tensors) and the labels of every image of ``dataset``, in order, on the CPU
    of every process: each process extracts its contiguous shard, then the shards are gathered."""
    own = shard(dataset, context.rank, context.world_size)
    parts: list[list[torch.Tensor]] = []
    labels = []
    for images, batch_labels in ordered_loader(own, batch_size, num_workers, context.device.type == "cuda"):
        parts.append([t.cpu() for t in inputs(images.to(context.device, non_blocking=True))])
        labels.append(torch.as_tensor(batch_labels).long())
    if not parts:  # an empty shard still needs the shapes of the others for the gather
        images = dataset[0][0].unsqueeze(0).to(context.device)
        parts.append([t.cpu()[:0] for t in inputs(images)])
        labels.append(torch.empty(0, dtype=torch.long))
    features = [torch.cat([part[i] for part in parts]) for i in range(len(parts[0]))]
    return [distributed.all_gather_rows(f) for f in features], distributed.all_gather_rows(torch.cat(labels))


def cached_inputs(path: str, key: dict[str, Any], extract: Callable[[], tuple[list[torch.Tensor], torch.Tensor]]
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The inputs and labels cached in ``path`` if it was written for ``key``, else ``extract()`` (a collective:
    every process calls it), written to ``path`` by the main process. Every process takes the same branch."""
    cached = read_checkpoint(path) if os.path.isfile(path) else None
    hit = isinstance(cached, dict) and cached.get("key") == key
    if not distributed.any_rank(not hit):
        logger.info(f"probe inputs read from {path}")
        return list(cached["features"]), cached["labels"]
    features, labels = extract()
    if distributed.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic({"key": key, "features": features, "labels": labels}, path)
        logger.info(f"probe inputs of {len(labels)} images extracted and cached in {path}")
    return features, labels

