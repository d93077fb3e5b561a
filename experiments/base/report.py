"""What the studies' reports share: the binomial noise of an accuracy and the threshold beyond which a difference is
called real, the table cells (the mean over seeds with each seed's value), and writing the report (``OUT/NAME.md``
and ``OUT/NAME.json``) with the command and the machine it ran on."""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import summary_line
from dino_sparo.utils.files import write_json_atomic, write_text_atomic

NOISE_SIGMAS = 2.0  # an accuracy difference is called real beyond this many binomial stds of the reference's


def binomial_sigma(top1_percent: float, n: int) -> float:
    """Standard deviation, in percentage points, of an accuracy ``top1_percent`` measured on ``n`` images:
    100 sqrt(p(1-p)/n)."""
    p = top1_percent / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / n)


def noise_mark(delta: float, sigma: float) -> str:
    """`` ↑`` or `` ↓`` when ``delta`` exceeds :data:`NOISE_SIGMAS` times ``sigma``, else nothing."""
    if abs(delta) <= NOISE_SIGMAS * sigma:
        return ""
    return " ↑" if delta > 0 else " ↓"


def cell(values: Sequence[float], digits: int = 1, sign: str = "") -> str:
    """``mean (seed 0 / seed 1 / ...)``; ``sign="+"`` signs every number; a dash when there are none."""
    if len(values) == 0:
        return "—"
    return f"{np.mean(values):{sign}.{digits}f} ({' / '.join(f'{v:{sign}.{digits}f}' for v in values)})"


def seed_values(records: Sequence[Mapping[str, Any]], split: str, metric: str) -> list[float]:
    """``metric`` on ``split`` of every seed's run record: ``k10``/``k20`` (k-NN top-1), a number of the split's
    entry (``linear``), else a slot statistic (``slot_peakedness``; runs without statistics are left out)."""
    if metric in ("k10", "k20"):
        return [record[split]["top1"][metric[1:]] for record in records]
    if metric in records[0][split]:
        return [record[split][metric] for record in records]
    return [record[split]["statistics"][metric] for record in records if record[split]["statistics"]]


def seed_mean(records: Sequence[Mapping[str, Any]], split: str, metric: str) -> float:
    return float(np.mean(seed_values(records, split, metric)))


def noise_note(reference: Sequence[Mapping[str, Any]], sizes: Mapping[str, int], who: str) -> str:
    """The binomial std, per split of ``sizes`` (split -> n), at ``reference``'s k=20 top-1 (``who`` names it)."""
    sigmas = ", ".join(f"{split} {binomial_sigma(seed_mean(reference, split, 'k20'), n):.1f}"
                       for split, n in sizes.items())
    return f"Binomial std at {who} k=20 top-1: {sigmas} points."


def study_command(study: str, argv: Sequence[str] | None) -> str:
    """The command line that ran ``experiments.<study>`` with ``argv`` (None: this process's arguments)."""
    return " ".join(["python -m", f"experiments.{study}", *(sys.argv[1:] if argv is None else argv)])


def write_report(out: Path, name: str, markdown: str, results: Mapping[str, Any], command: str,
                 seconds: float) -> dict[str, Any]:
    """Prints ``markdown`` and writes it, with a last line naming the command, the machine and this invocation's
    wall time, to ``out/name.md``; writes ``results`` with the same facts to ``out/name.json``. Returns what the
    JSON holds."""
    facts = f"Command: `{command}`; machine: {summary_line()}; {seconds / 60:.1f} min (this invocation, which " \
            f"reuses finished runs)."
    text = f"{markdown.rstrip()}\n\n{facts}\n"
    print(text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(text, out / f"{name}.md")
    summary = {"command": command, "machine": summary_line(), "wall_seconds": seconds, **results}
    write_json_atomic(summary, out / f"{name}.json")
    return summary
