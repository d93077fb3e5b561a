"""The figures of a training run, read from what main_dino.py writes rather than from what it prints:
``OUTPUT_DIR/log.txt``, one JSON record per completed epoch (``epoch``, ``images_per_s``, ``data_wait_share``, and
the run's ``precision``, ``device``, ``augment_device``, ``world_size``, ``resumed_from_epoch`` /
``resumed_from_iteration`` after a resume, ``max_memory_mb`` on a GPU). A key an older main_dino.py does not write
reads as "not recorded" instead of failing the check."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dino_sparo.utils.files import read_json_lines

NOT_RECORDED = "not recorded in log.txt"


@dataclass
class TrainingLog:
    """The epoch records of one output folder (possibly written by several runs: stopped, then resumed)."""

    records: list[dict[str, Any]]

    @classmethod
    def read(cls, output_dir: Path) -> TrainingLog:
        """The records of ``output_dir/log.txt``; ``ValueError`` naming the file when a line is not JSON."""
        path = output_dir / "log.txt"
        try:
            return cls(read_json_lines(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} holds a line that is not JSON: {error}") from None

    @property
    def epochs(self) -> list[int]:
        return [record["epoch"] for record in self.records if "epoch" in record]

    def fact(self, key: str) -> Any:
        """The value every record that has ``key`` agrees on; None when none has it; ``ValueError`` on a conflict."""
        values = {json.dumps(record[key]) for record in self.records if key in record}
        if len(values) > 1:
            raise ValueError(f"log.txt records disagree on {key}: {', '.join(sorted(values))}")
        return json.loads(values.pop()) if values else None

    def median(self, key: str, skip_first: bool = False) -> float | None:
        """Median of ``key`` over the records (``skip_first``: leaving out the first epoch, which holds the
        warm-up, when there are others); None when no record has it."""
        records = self.records[1:] if skip_first and len(self.records) > 1 else self.records
        values = [record[key] for record in records if isinstance(record.get(key), (int, float))]
        return statistics.median(values) if values else None

    def resumed_at(self) -> tuple[int, int] | None:
        """(epoch, iteration) a resumed run started from, as its first record says; None when no run resumed or
        main_dino.py does not record it."""
        for record in self.records:
            if "resumed_from_epoch" in record:
                return record["resumed_from_epoch"], record.get("resumed_from_iteration", 0)
        return None


def describe_setup(log: TrainingLog) -> str:
    """``bf16 on cuda:0`` from the records, with what is not recorded said so."""
    precision, device = log.fact("precision"), log.fact("device")
    return f"{precision or 'precision ' + NOT_RECORDED} on {device or 'device ' + NOT_RECORDED}"


def setup_problem(log: TrainingLog, precision: str | None, device: str) -> str | None:
    """Why the run did not train in ``precision`` (None: any) on ``device`` (a prefix, ``cuda`` or ``cpu``), or
    None when it did or the records do not say (a missing fact is noted, not failed)."""
    recorded_precision, recorded_device = log.fact("precision"), log.fact("device")
    wrong = (precision is not None and recorded_precision not in (None, precision)) or \
        (recorded_device is not None and not str(recorded_device).startswith(device))
    if not wrong:
        return None
    return f"ran with {describe_setup(log)}, expected {precision or 'any precision'} on {device}"


def benchmark_rows(path: Path) -> list[dict[str, Any]]:
    """The rows ``python -m benchmarks.run --json PATH`` has finished so far (it rewrites the file atomically
    after each group, so the file is always complete); none before the first."""
    try:
        return json.loads(path.read_text())["rows"]
    except FileNotFoundError:
        return []
