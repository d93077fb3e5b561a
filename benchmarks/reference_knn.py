"""The reference DINO k-NN loop, re-expressed for timing: 100 test chunks, one-hot retrieval, full sort.

Kept only as the benchmark baseline so speed-ups are ratios measured in the same run.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def reference_knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                             test_labels: torch.Tensor, k: int, T: float, num_classes: int) -> tuple[float, float]:
    top1 = top5 = 0
    train_t = train_features.t()
    num_test = test_labels.shape[0]
    per_chunk = max(1, num_test // 100)
    one_hot = torch.zeros(k, num_classes, device=train_features.device)
    for start in range(0, num_test, per_chunk):
        features = test_features[start:start + per_chunk]
        targets = test_labels[start:start + per_chunk]
        batch = targets.shape[0]
        distances, indices = torch.mm(features, train_t).topk(k, largest=True, sorted=True)
        neighbours = torch.gather(train_labels.view(1, -1).expand(batch, -1), 1, indices)
        one_hot.resize_(batch * k, num_classes).zero_()
        one_hot.scatter_(1, neighbours.view(-1, 1), 1)
        weights = distances.clone().div_(T).exp_()
        probs = torch.sum(one_hot.view(batch, -1, num_classes) * weights.view(batch, -1, 1), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        # min(.., num_classes): the reference fails with fewer than 5 classes, a case it was never run on
        top5 += correct.narrow(1, 0, min(5, k, num_classes)).sum().item()
    return 100.0 * top1 / num_test, 100.0 * top5 / num_test
