import math

import numpy as np
import pytest

from dino_sparo.train.schedules import cosine_scheduler


def test_warmup_then_cosine_values():
    base, final, epochs, niter, warmup = 1.0, 0.1, 5, 4, 2
    schedule = cosine_scheduler(base, final, epochs, niter, warmup_epochs=warmup, start_warmup_value=0.0)
    assert len(schedule) == epochs * niter
    warmup_iters = warmup * niter
    # linear warm-up from 0 to base over 8 iterations (both ends included)
    assert np.allclose(schedule[:warmup_iters], np.arange(warmup_iters) / (warmup_iters - 1) * base)
    # cosine part: value at step s of the 12 remaining iterations
    cosine_iters = epochs * niter - warmup_iters
    for step in (0, 3, 6, 11):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / cosine_iters))
        assert math.isclose(schedule[warmup_iters + step], expected, rel_tol=1e-12)
    assert schedule[warmup_iters] == base
    assert np.all(np.diff(schedule[warmup_iters:]) < 0)


def test_increasing_schedule_for_teacher_momentum():
    schedule = cosine_scheduler(0.996, 1.0, 10, 7)
    assert len(schedule) == 70
    assert schedule[0] == pytest.approx(0.996) and schedule[-1] < 1.0
    assert np.all(np.diff(schedule) > 0)
    assert schedule[35] == pytest.approx(0.998)


def test_warmup_longer_than_training_is_all_warmup():
    schedule = cosine_scheduler(1.0, 0.0, 2, 3, warmup_epochs=5)
    assert len(schedule) == 6
    assert np.allclose(schedule, np.linspace(0, 1, 6))
