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


# --- sharded k-NN (the train bank split across processes, partial top-k lists merged) ---



from dino_sparo.distributed import shard_bounds  # noqa: E402
from dino_sparo.eval.knn import sharded_knn  # noqa: E402

KS = (1, 5, 20, 200)


def _random_problem(num_train: int, num_test: int, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(10, 16, generator=generator), dim=1)
    train_labels = torch.randint(0, 10, (num_train,), generator=generator)
    test_labels = torch.randint(0, 10, (num_test,), generator=generator)
    train = F.normalize(centres[train_labels] + 0.8 * torch.randn(num_train, 16, generator=generator), dim=1)
    test = F.normalize(centres[test_labels] + 0.8 * torch.randn(num_test, 16, generator=generator), dim=1)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("num_test", [1, 37])
def test_sharded_knn_in_one_process_equals_knn_classifier(num_test):
    train, train_labels, test, test_labels = _random_problem(150, num_test)
    results = sharded_knn(train, train_labels, test, test_labels, KS, 0.07, num_classes=10,
                          max_similarities=150 * 7)  # several chunks of 7 queries
    for k in KS:  # k=200 exceeds the 150 train images: all of them vote
        assert results[k] == pytest.approx(knn_classifier(train, train_labels, test, test_labels, k, 0.07, 10))


def _sharded_results(rank: int, world_size: int) -> dict:
    """One of two gloo processes: each problem's k-NN with this rank's shards of train and test."""
    results = {}
    for num_test in (1, 37):
        train, train_labels, test, test_labels = _random_problem(151, num_test)
        a, b = shard_bounds(len(train), rank, world_size)
        c, d = shard_bounds(len(test), rank, world_size)
        results[num_test] = sharded_knn(train[a:b], train_labels[a:b], test[c:d], test_labels[c:d], KS, 0.07, 10,
                                        max_similarities=76 * 5)
    return results


def test_two_processes_give_the_same_accuracy_as_one(gloo_pair):
    # With one test image, rank 1 holds no test feature at all; with 151 train images the shards are uneven.
    by_rank = gloo_pair.run(_sharded_results)
    results = {(rank, num_test): result for rank, ranked in enumerate(by_rank) for num_test, result in ranked.items()}
    for num_test in (1, 37):
        train, train_labels, test, test_labels = _random_problem(151, num_test)
        for k in KS:
            expected = knn_classifier(train, train_labels, test, test_labels, k, 0.07, 10)
            assert results[0, num_test][k] == pytest.approx(expected)
            assert results[1, num_test][k] == pytest.approx(expected)


def test_sweep_over_k_and_temperature_equals_every_single_knn():
    from dino_sparo.eval.knn import sharded_knn_sweep

    train, train_labels, test, test_labels = _random_problem(150, 37)
    temperatures = (0.02, 0.07, 0.5)
    sweep = sharded_knn_sweep(train, train_labels, test, test_labels, KS, temperatures, num_classes=10,
                              max_similarities=150 * 7)
    assert set(sweep) == {(k, T) for k in KS for T in temperatures}
    for (k, T), result in sweep.items():
        assert result == pytest.approx(knn_classifier(train, train_labels, test, test_labels, k, T, 10))
    assert len({sweep[200, T] for T in temperatures}) > 1  # the temperature changes the vote here
    with pytest.raises(ValueError, match="temperatures must be positive"):
        sharded_knn_sweep(train, train_labels, test, test_labels, KS, [0.07, 0.0], num_classes=10)
