"""``from dino_sparo.schedules import cosine_scheduler``, DINO's schedule function, as the public API names it; the
training schedules live in :mod:`dino_sparo.train.schedules`."""
from __future__ import annotations

from .train.schedules import cosine_scheduler

__all__ = ["cosine_scheduler"]
