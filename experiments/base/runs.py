"""The studies' training runs: one builder (the demo recipe, ``configs/demo.yaml``, plus a configuration's flags:
the run's ``main_dino.py`` command line and the config it resolves to), the run's training and its log, and the one
cache of finished runs (``result.json``)."""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dino_sparo.models import build_backbone
from dino_sparo.models.backbone import ReadoutBackbone
from dino_sparo.train import train_dino
from dino_sparo.train.config import TrainConfig, parse_config
from dino_sparo.utils.files import read_json_lines, write_json_atomic

from .data import DataSet

RECIPE = "demo"  # configs/demo.yaml: ViT-Tiny/8, depth 3, 32/16 px crops
# What every study's run adds to the recipe: the CPU, fp32, two loader workers; only the last checkpoint, no
# figures, no step lines (the epoch lines are in log.txt).
RUN_FLAGS: dict[str, Any] = {"num_workers": 2, "device": "cpu", "precision": "fp32", "saveckp_freq": 0,
                             "viz_freq": 0, "log_freq": 1000}
# The paper's SPARO read-out and initialisation (key gain 1, query std 1), every flag a study varies stated, so that
# a later change of a package default cannot change what a configuration built on it measures.
PAPER_SPARO: dict[str, Any] = {"readout": "sparo", "readout_replace_blocks": 1, "sparo_key_init_gain": 1,
                               "sparo_query_init_std": 1, "sparo_lr_mult": 1}
DINO_CLS: dict[str, Any] = {"readout": "cls", "readout_replace_blocks": 0}  # DINO's read-out: the last block's CLS
# A teacher is called collapsed one-hot when this share of its outputs picks one prototype (the package's health
# check's threshold), uniform when its entropy is within this fraction of ln(out_dim) (the margin the check gives
# the loss).
ONE_HOT_MODE_SHARE = 0.95
UNIFORM_ENTROPY_MARGIN = 0.01


@dataclass(frozen=True)
class Configuration:
    """What a study varies: ``flags`` (main_dino.py's flag names without the dashes) on top of the recipe."""
    name: str
    flags: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def readout(self) -> str:
        return str(self.flags.get("readout", "sparo"))  # main_dino.py's default read-out


def flag_words(flags: Mapping[str, Any]) -> list[str]:
    """``flags`` as command-line words: ``--name value`` (booleans as true/false, a list as its items)."""
    words = []
    for name, value in flags.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        words += [f"--{name}", *(str(item).lower() if isinstance(item, bool) else str(item) for item in values)]
    return words


@dataclass(frozen=True)
class TrainingRun:
    """One ``main_dino.py`` run: its command line (``argv``) and the config it resolves to."""
    argv: tuple[str, ...]
    config: TrainConfig

    @property
    def command(self) -> str:
        return "python main_dino.py " + " ".join(self.argv)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def checkpoint(self) -> Path:
        return self.output_dir / "checkpoint.pth"

    def initial_backbone(self) -> ReadoutBackbone:
        """A backbone of the run's model, built right after seeding with the run's seed: what training starts from."""
        torch.manual_seed(self.config.seed)
        return build_backbone(self.config.model)

    def train(self) -> dict[str, Any]:
        """Trains (an interrupted run in the same folder resumes from its checkpoint); returns the command, the
        training time and the last epoch's log entry."""
        started = time.perf_counter()
        train_dino(self.config)
        return {"command": self.command, "train_seconds": time.perf_counter() - started,
                "last_epoch": training_log(self.output_dir)[-1]}


def training_run(data_set: DataSet, run_dir: Path, seed: int, epochs: int, flags: Mapping[str, Any] | None = None
                 ) -> TrainingRun:
    """The run of the recipe with :data:`RUN_FLAGS` and ``flags`` (these win) on ``data_set``'s training part,
    writing to ``run_dir``. A flag main_dino.py does not take, or a bad value, fails here, before any training."""
    argv = ["--config", RECIPE, "--data_path", str(data_set.root / "train"), "--output_dir", str(run_dir),
            "--epochs", str(epochs), "--seed", str(seed), *flag_words({**RUN_FLAGS, **(flags or {})})]
    return TrainingRun(tuple(argv), parse_config(argv))


def cached_run(run_dir: Path, work: Callable[[], dict[str, Any]], log_name: str = "train.log") -> dict[str, Any]:
    """The record of ``run_dir/result.json`` when it exists (the run is not repeated, so an interrupted study
    continues where it stopped); else ``work()``, its output (stdout and stderr, the package's log included) in
    ``run_dir/log_name``, and its record written to ``result.json`` atomically once it has returned: a run that
    fails leaves no result and is repeated by the next call."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / log_name, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        record = work()
    write_json_atomic(record, result_path)
    return record


def training_log(run_dir: Path) -> list[dict[str, Any]]:
    """The epochs of a run's ``log.txt``, one entry each."""
    return read_json_lines(run_dir / "log.txt")


def collapse(epoch: Mapping[str, Any], out_dim: int) -> str | None:
    """``one-hot`` or ``uniform`` when an epoch's teacher (``train_teacher_mode_share``, ``train_teacher_entropy``
    of log.txt) looks collapsed that way; None when it does not."""
    if epoch["train_teacher_mode_share"] >= ONE_HOT_MODE_SHARE:
        return "one-hot"
    if epoch["train_teacher_entropy"] >= (1 - UNIFORM_ENTROPY_MARGIN) * math.log(out_dim):
        return "uniform"
    return None
