import math

import pytest
import torch
import torch.nn.functional as F

from dino_sparo.eval.knn import knn_classifier


def test_knn_known_answer_with_exponential_weights():
    # Train points on the unit circle; a query near class 1's single point but with two class-0 points
    # further away: the vote depends on exp(sim / T), so T decides the answer.
    angles = torch.tensor([0.0, 0.35, 0.45])  # class 1 at 0 rad, class 0 at 0.35 and 0.45 rad
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[math.cos(0.1), math.sin(0.1)]])
    sims = (query @ train.T)[0]
    for T in (0.05, 1.0):
        weights = (sims / T).exp()
        expected = 1 if weights[0] > weights[1:].sum() else 0
        top1, top5 = knn_classifier(train, labels, query, torch.tensor([expected]), k=3, T=T)
        assert top1 == 100.0 and top5 == 100.0
    # T=0.05 picks class 1, T=1 picks class 0: both branches above were exercised.
    assert (sims[0] / 0.05).exp() > (sims[1:] / 0.05).exp().sum()
    assert (sims[0] / 1.0).exp() < (sims[1:] / 1.0).exp().sum()


def test_knn_top5_with_fewer_than_five_classes_and_one_test_image():
    train = F.normalize(torch.randn(20, 8), dim=1)
    labels = torch.arange(20) % 3
    query = train[:1] + 0.01
    top1, top5 = knn_classifier(train, labels, F.normalize(query, dim=1), labels[:1], k=200, T=0.07)
    assert top1 == 100.0 and top5 == 100.0
    _, top5_wrong = knn_classifier(train, labels, F.normalize(query, dim=1), torch.tensor([3]), k=5, T=0.07,
                                   num_classes=4)
    assert top5_wrong == 100.0  # with 4 classes "top-5" is every class that exists


@pytest.mark.parametrize("num_test", [1, 37])
def test_knn_matches_brute_force(num_test):
    generator = torch.Generator().manual_seed(1)
    train = F.normalize(torch.randn(300, 16, generator=generator), dim=1)
    train_labels = torch.randint(0, 10, (300,), generator=generator)
    test = F.normalize(torch.randn(num_test, 16, generator=generator), dim=1)
    test_labels = torch.randint(0, 10, (num_test,), generator=generator)
    correct1 = correct5 = 0
    for query, label in zip(test, test_labels):
        sims = train @ query
        order = sims.argsort(descending=True)[:20]
        votes = torch.zeros(10)
        for index in order:
            votes[train_labels[index]] += math.exp(sims[index].item() / 0.07)
        ranking = votes.argsort(descending=True)
        correct1 += int(ranking[0] == label)
        correct5 += int(label in ranking[:5])
    top1, top5 = knn_classifier(train, train_labels, test, test_labels, k=20, T=0.07, num_classes=10)
    assert top1 == pytest.approx(100.0 * correct1 / num_test)
    assert top5 == pytest.approx(100.0 * correct5 / num_test)
