"""Per-iteration schedules (learning rate, weight decay, teacher momentum) as in DINO."""
from __future__ import annotations

import numpy as np


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """One value per iteration (``epochs * niter_per_ep``): a linear warm-up from ``start_warmup_value`` to
    ``base_value`` over ``warmup_epochs``, then a cosine from ``base_value`` down (or up) to ``final_value``."""
    total = epochs * niter_per_ep
    warmup_iters = min(warmup_epochs * niter_per_ep, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule
