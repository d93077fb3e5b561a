"""Weighted k-NN classification of L2-normalised features (DINO's protocol), chunked matmul + top-k."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import distributed


def knn_vote(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, T: float,
             num_classes: int) -> torch.Tensor:
    """Class scores (Q, C) from each query's neighbours: sum over neighbours of exp(sim / T) per label."""
    weights = (neighbour_sims.float() / T).exp()
    scores = torch.zeros(neighbour_sims.shape[0], num_classes, device=neighbour_sims.device)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Number of queries whose label is the top-1 and within the top-5 (or top-C if C < 5) scores."""
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def _chunk_size(num_train: int, budget: int = 1 << 24) -> int:
    """Test rows per similarity matrix, so one chunk holds about ``budget`` similarities."""
    return max(1, budget // max(1, num_train))


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: int | None = None
                   ) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of a k-NN vote weighted by exp(cosine / T).

    Features must already be L2-normalised. ``num_classes`` defaults to the largest label seen + 1. Works
    for any number of test images from 1 up; ``k`` larger than the training set uses all of it.
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one train and one test feature")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    train_labels = train_labels.to(train_features.device)
    top1 = top5 = 0
    step = _chunk_size(train_features.shape[0])
    for start in range(0, test_features.shape[0], step):
        queries = test_features[start:start + step]
        sims, indices = (queries @ train_features.T).topk(k, dim=1)
        scores = knn_vote(sims, train_labels[indices], T, num_classes)
        hits1, hits5 = topk_accuracy(scores, test_labels[start:start + step].to(scores.device))
        top1 += hits1
        top5 += hits5
    total = test_features.shape[0]
    return 100.0 * top1 / total, 100.0 * top5 / total


@torch.no_grad()
def sharded_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                test_labels: torch.Tensor, ks: Sequence[int], T: float, num_classes: int,
                max_similarities: int = 1 << 25) -> dict[int, tuple[float, float]]:
    """k-NN top-1/top-5 (percent) for every ``k`` in ``ks`` at temperature ``T``: :func:`sharded_knn_sweep` with
    one temperature."""
    sweep = sharded_knn_sweep(train_features, train_labels, test_features, test_labels, ks, [T], num_classes,
                              max_similarities)
    return {k: sweep[k, T] for k in ks}


@torch.no_grad()
def sharded_knn_sweep(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                      test_labels: torch.Tensor, ks: Sequence[int], temperatures: Sequence[float], num_classes: int,
                      max_similarities: int = 1 << 25) -> dict[tuple[int, float], tuple[float, float]]:
    """k-NN top-1/top-5 (percent) for every ``(k, T)`` of ``ks`` x ``temperatures``, with train and test sets split
    across ranks; the neighbours are searched once, for the largest k, and every (k, T) votes from them.

    Each rank passes its own shard of both sets (L2-normalised, any sizes, possibly empty). The test shard of
    each rank in turn is broadcast in chunks; every rank ranks the chunk against its train shard only, the
    partial top-k lists (similarities and labels) are all-gathered and merged into the global top-k, and
    the weighted vote is :func:`knn_vote`. No rank ever holds the whole train bank, and a chunk's
    similarity matrix is kept under ``max_similarities`` entries. Without a process group this is plain
    k-NN over the given sets; every rank returns the same result.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {list(ks)}")
    if not temperatures or min(temperatures) <= 0:
        raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
    pairs = [(k, T) for T in temperatures for k in ks]
    device = train_features.device
    train_sizes = distributed.all_gather_sizes(train_features.shape[0])
    test_sizes = distributed.all_gather_sizes(test_features.shape[0])
    if sum(train_sizes) == 0 or sum(test_sizes) == 0:
        raise ValueError("k-NN needs at least one train and one test feature")
    k_max = min(max(ks), sum(train_sizes))
    local_k = min(k_max, train_features.shape[0])
    chunk = _chunk_size(max(train_sizes), max_similarities)
    train_labels = train_labels.to(device)
    hits = torch.zeros(len(pairs), 2, dtype=torch.long)
    for owner, owner_size in enumerate(test_sizes):
        for start in range(0, owner_size, chunk):
            rows = min(chunk, owner_size - start)
            if owner == distributed.get_rank():
                queries = test_features[start:start + rows].to(device)
                labels = test_labels[start:start + rows].to(device)
            else:
                queries = train_features.new_empty((rows, train_features.shape[1]))
                labels = torch.empty(rows, dtype=torch.long, device=device)
            queries = distributed.broadcast_from(queries, owner)
            labels = distributed.broadcast_from(labels.long(), owner)
            # Partial top-k against this rank's shard, padded to k_max with -inf (weight exp(-inf) = 0).
            sims = torch.full((rows, k_max), float("-inf"), device=device)
            neighbours = torch.zeros((rows, k_max), dtype=torch.long, device=device)
            if local_k > 0:
                local_sims, indices = (queries @ train_features.T).topk(local_k, dim=1)
                sims[:, :local_k] = local_sims.float()
                neighbours[:, :local_k] = train_labels[indices]
            all_sims = torch.cat(distributed.all_gather_equal(sims), dim=1)
            all_labels = torch.cat(distributed.all_gather_equal(neighbours), dim=1)
            merged_sims, order = all_sims.topk(k_max, dim=1)  # sorted, so the first k are the k nearest
            merged_labels = all_labels.gather(1, order)
            for index, (k, T) in enumerate(pairs):
                scores = knn_vote(merged_sims[:, :k], merged_labels[:, :k], T, num_classes)
                hits[index] += torch.tensor(topk_accuracy(scores, labels))
    total = sum(test_sizes)
    return {pair: (100.0 * int(hits[i, 0]) / total, 100.0 * int(hits[i, 1]) / total) for i, pair in enumerate(pairs)}
