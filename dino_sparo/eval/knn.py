"""Weighted k-NN classification of L2-normalised features (DINO's protocol), chunked matmul + top-k."""
from __future__ import annotations

import torch


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
