"""Timing and table printing shared by the benchmarks (machine facts: :mod:`benchmarks.machine`; atomic
JSON: :mod:`dino_sparo.utils.files`)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Minimum wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs; the minimum is the figure
    least disturbed by other load on a shared machine."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)

