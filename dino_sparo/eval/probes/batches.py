"""Where each batch of a probe's frozen inputs comes from: the backbone run on the images of the batch (augmented
training views), or the rows of inputs extracted once and cached (epoch-invariant views). Both deal the training
set to the processes in the same seeded order, so the two give the same batches."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ...data.datasets import ordered_loader, shard
from ...distributed import DistributedContext, shard_bounds

Batch = tuple[list[torch.Tensor], torch.Tensor]  # the inputs (one tensor per input set) and the labels


class ImageBatches:
    """Batches computed from images: ``inputs(images)`` once per batch for every head."""

    def __init__(self, inputs: nn.Module, train_set: Dataset, evaluation_sets: dict[str, Dataset], batch_size: int,
                 num_workers: int, context: DistributedContext, seed: int) -> None:
        self.inputs, self.context = inputs, context
        self.sampler = DistributedSampler(train_set, num_replicas=context.world_size, rank=context.rank,
                                          shuffle=True, seed=seed)
        pin = context.device.type == "cuda"
        self.loader = DataLoader(train_set, sampler=self.sampler, batch_size=batch_size, num_workers=num_workers,
                                 pin_memory=pin)
        self.evaluation_loaders = {name: ordered_loader(shard(dataset, context.rank, context.world_size),
                                                        batch_size, num_workers, pin)
                                   for name, dataset in evaluation_sets.items()}

    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def train(self, epoch: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        for images, labels in self.loader:
            yield self._batch(images, labels)

    def evaluation(self, name: str) -> Iterator[Batch]:
        for images, labels in self.evaluation_loaders[name]:
            yield self._batch(images, labels)

    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        device = self.context.device
        return self.inputs(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)


class CachedBatches:
    """Batches of rows of inputs extracted once (:mod:`~dino_sparo.eval.probes.cache`): ``train`` holds the
    training set's, ``evaluation_sets`` the held-out and val sets', every process all of them."""

    def __init__(self, train: tuple[Sequence[torch.Tensor], torch.Tensor],
                 evaluation_sets: dict[str, tuple[Sequence[torch.Tensor], torch.Tensor]], batch_size: int,
                 context: DistributedContext, seed: int) -> None:
        self.train_rows, self.evaluation_rows = train, evaluation_sets
        self.batch_size, self.context = batch_size, context
        # The sampler only reads the length of its "dataset": the same order as ImageBatches' over the images.
        self.sampler = DistributedSampler(range(len(train[1])), num_replicas=context.world_size, rank=context.rank,
                                          shuffle=True, seed=seed)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def train(self, epoch: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            yield self._rows(self.train_rows, order[start:start + self.batch_size])

    def evaluation(self, name: str) -> Iterator[Batch]:
        rows = self.evaluation_rows[name]
        start, end = shard_bounds(len(rows[1]), self.context.rank, self.context.world_size)
        for first in range(start, end, self.batch_size):
            yield self._rows(rows, torch.arange(first, min(end, first + self.batch_size)))

    def _rows(self, rows: tuple[Sequence[torch.Tensor], torch.Tensor], index: torch.Tensor) -> Batch:
        device = self.context.device
        features, labels = rows
        return [f[index].to(device, non_blocking=True) for f in features], labels[index].to(device)
