"""k-NN classification time: this project's chunked matmul + top-k against the reference loop."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dino_sparo.eval.knn import knn_classifier

from .common import best_time
from .reference_knn import reference_knn_classifier


def clustered_features(num: int, dim: int, centers: torch.Tensor, noise: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors scattered around class centres, so accuracy is far from both chance and 100%."""
    labels = torch.randint(0, centers.shape[0], (num,), generator=generator)
    features = centers[labels] + noise * torch.randn(num, dim, generator=generator)
    return F.normalize(features, dim=1), labels


def bench_knn(num_train: int, num_test: int, dim: int, num_classes: int, k: int, repeats: int,
              device: str) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    train, train_labels = clustered_features(num_train, dim, centers, 0.06, generator)
    test, test_labels = clustered_features(num_test, dim, centers, 0.06, generator)
    train, train_labels, test, test_labels = (t.to(device) for t in (train, train_labels, test, test_labels))
    shape = f"{num_train}x{num_test}x{dim}d C={num_classes} k={k}"
    rows = []
    for name, classifier in (("baseline", reference_knn_classifier), ("fast", knn_classifier)):
        seconds, (top1, top5) = best_time(
            lambda: classifier(train, train_labels, test, test_labels, k, 0.07, num_classes), repeats)
        rows.append({"bench": "knn", "config": shape, "mode": name, "seconds": seconds, "top1": top1,
                     "top5": top5})
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    rows[1]["identical"] = (rows[0]["top1"], rows[0]["top5"]) == (rows[1]["top1"], rows[1]["top5"])
    return rows
