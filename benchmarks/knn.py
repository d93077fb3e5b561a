"""k-NN classification time: what the evaluation calls (:func:`dino_sparo.eval.knn.sharded_knn`: chunked matmul +
top-k, which in a single process is plain k-NN over the given sets) against the reference loop."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dino_sparo.eval.knn import sharded_knn

from .common import best_time
from .reference_knn import reference_knn_classifier


def clustered_features(num: int, dim: int, centers: torch.Tensor, noise: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors scattered around class centres, so accuracy is far from both chance and 100%."""
    labels = torch.randint(0, centers.shape[0], (num,), generator=generator)
    features = centers[labels] + noise * torch.randn(num, dim, generator=generator)
    return F.normalize(features, dim=1), labels


def bench_knn(num_train: int, num_test: int, dim: int, num_classes: int, k: int, repeats: int,
              device: torch.device | str, modes: Sequence[str] = ("baseline", "fast")) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    # Noise of norm ~3 around unit centres: about 70% top-1 at 50k x 384-d x 1000 classes, k=20, far from
    # both 100% and chance, so a wrong neighbour or vote would show.
    noise = 3.0 / dim ** 0.5
    train, train_labels = clustered_features(num_train, dim, centers, noise, generator)
    test, test_labels = clustered_features(num_test, dim, centers, noise, generator)
    train, train_labels, test, test_labels = (t.to(device) for t in (train, train_labels, test, test_labels))
    shape = f"{num_train}x{num_test}x{dim}d C={num_classes} k={k}"
    rows = []
    classifiers = {
        "baseline": lambda: reference_knn_classifier(train, train_labels, test, test_labels, k, 0.07, num_classes),
        "fast": lambda: sharded_knn(train, train_labels, test, test_labels, [k], 0.07, num_classes)[k],
    }
    for name, classify in classifiers.items():
        if name not in modes:
            continue
        seconds, (top1, top5) = best_time(classify, repeats)
        rows.append({"bench": "knn", "config": shape, "mode": name, "seconds": seconds, "top1": top1,
                     "top5": top5})
    if len(rows) == 2:
        rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
        rows[1]["identical"] = (rows[0]["top1"], rows[0]["top5"]) == (rows[1]["top1"], rows[1]["top5"])
    return rows
