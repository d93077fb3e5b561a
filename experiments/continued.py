"""Continued training from trained weights, at equal wall time: what the second stage (``--unfreeze_at``) buys over
stage 1 alone (the retrofit) and over SPARO from scratch, and whether any of them keeps the trained model's quality
(facebookresearch/dinov2 issue 204: restarting DINO from released weights with fresh heads lost most of the k-NN).

    python -m experiments.continued --out experiments/results/continued

Two real sets (:mod:`experiments.base.data`): photos, and scenes, a third set of other photos kept out of the
repository. The "released weights" are a CLS model trained here first (the demo recipe, 10 epochs, DINO's
read-out). The digits are left out by default: there the recipe's CLS teacher ends uniform (collapsed) under every
change tried (experiments/readouts.py's REMEDIES says which), so it cannot stand in for released weights. Every
other run starts from the source with the SPARO read-out and gets the source's own training time as its budget:
``stage1`` (frozen blocks, as many epochs as fit), ``stage12`` (frozen, then unfrozen at ``--unfreeze_at`` with
``--backbone_lr``), ``naive`` (unfrozen from the start, the failure the two stages avoid), and ``scratch`` (SPARO
from random weights). Epochs per budget come from each kind's measured time per epoch. The switch point and the
backbone's learning rate are chosen on the held-out images of seed 0 (:data:`STAGE2_GRID`); val chooses nothing.
Per run: k-NN top-1 (k = 10, 20) and the linear probe over eval_linear.py's learning-rate grid, on held-out and val.
"""
from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base.data import DATA_SETS, DataSet
from .base.evaluation import EVALUATED_SPLITS, knn_on_splits, probe
from .base.report import binomial_sigma, cell, noise_mark, noise_note, seed_values, study_command, write_report
from .base.runs import DINO_CLS, cached_run, collapse, training_log, training_run

SOURCE_EPOCHS = 10
SPARO = {"readout": "sparo", "readout_replace_blocks": 1}  # the demo recipe's 16 slots of 16
STAGE2_GRID = {"unfreeze_at": (2, 6), "backbone_lr": (0.0004, 0.004)}  # 0.004: the recipe's own --lr
KINDS = ("stage1", "stage12", "naive", "scratch")
DESCRIPTIONS = {
    "source": "the CLS model the others start from (10 epochs)",
    "stage1": "stage 1 only: blocks frozen, the SPARO read-out and a fresh head train",
    "stage12": "stage 1, then stage 2: the blocks unfrozen at the chosen epoch and learning rate",
    "naive": "no stage 1: every block trains from the first step, the read-out and head fresh",
    "scratch": "SPARO from random weights",
}


def train(data_set: DataSet, run_dir: Path, seed: int, epochs: int, flags: dict[str, Any], probes: bool
          ) -> dict[str, Any]:
    """One run, cached: trained, its teacher's k-NN on both splits, and with ``probes`` the linear grid probe; the
    checkpoint is kept (sources start others; the rest are small)."""
    def work() -> dict[str, Any]:
        training = training_run(data_set, run_dir, seed, epochs, flags)
        record = {"seed": seed, "epochs": epochs, "flags": flags, **training.train(),
                  **knn_on_splits(training.checkpoint, data_set, run_dir)}
        record["collapse"] = collapse(record["last_epoch"], training.config.out_dim)
        record["epoch_seconds"] = float(np.mean([epoch["epoch_time_s"] for epoch in training_log(run_dir)]))
        if probes:
            for split in EVALUATED_SPLITS:
                record[split]["linear"] = probe(training.checkpoint, data_set.root / f"knn_{split}",
                                                run_dir / f"linear_{split}")["top1"]
        return record

    return cached_run(run_dir, work)


def flags_of(kind: str, source: Path, unfreeze_at: int = 0, backbone_lr: float = 0.0) -> dict[str, Any]:
    if kind == "scratch":
        return dict(SPARO)
    start = {**SPARO, "init_from": str(source)}
    if kind == "naive":
        return start
    frozen = {**start, "freeze_blocks": "all"}
    if kind == "stage1":
        return frozen
    return {**frozen, "unfreeze_at": unfreeze_at, "backbone_lr": backbone_lr, "unfreeze_warmup": 20}


def epochs_for(kind: str, budget: float, seconds: dict[str, float], unfreeze_at: int = 0) -> int:
    """Epochs of ``kind`` that fit ``budget`` seconds, from the measured seconds per epoch frozen and unfrozen."""
    if kind == "stage1":
        return max(1, round(budget / seconds["frozen"]))
    if kind == "stage12":
        return unfreeze_at + max(1, round((budget - unfreeze_at * seconds["frozen"]) / seconds["full"]))
    return max(1, round(budget / seconds["full"]))


def run_set(data_set: DataSet, seeds: Sequence[int], out: Path) -> dict[str, Any]:
    runs = out / "runs" / data_set.name
    sources = {seed: train(data_set, runs / "source" / f"seed{seed}", seed, SOURCE_EPOCHS, dict(DINO_CLS), True)
               for seed in seeds}
    checkpoints = {seed: runs / "source" / f"seed{seed}" / "checkpoint.pth" for seed in seeds}
    budget = float(np.mean([record["train_seconds"] for record in sources.values()]))
    # seconds per epoch of a frozen and of an unfrozen SPARO run from the source (one epoch each, seed 0)
    timing = {name: train(data_set, runs / "timing" / name, seeds[0], 1, flags_of(kind, checkpoints[seeds[0]]), False)
              for name, kind in (("frozen", "stage1"), ("full", "naive"))}
    seconds = {name: record["epoch_seconds"] for name, record in timing.items()}
    grid = {}
    for unfreeze_at, backbone_lr in itertools.product(*STAGE2_GRID.values()):
        name = f"stage12_at{unfreeze_at}_lr{backbone_lr:g}"
        grid[name] = train(data_set, runs / name / f"seed{seeds[0]}", seeds[0],
                           epochs_for("stage12", budget, seconds, unfreeze_at),
                           flags_of("stage12", checkpoints[seeds[0]], unfreeze_at, backbone_lr), False)
    return {"sources": sources, "budget_seconds": budget, "epoch_seconds": seconds, "grid": grid}


def choose_stage2(by_set: dict[str, dict[str, Any]]) -> tuple[int, float]:
    """The (switch epoch, backbone lr) of :data:`STAGE2_GRID` with the best held-out k-NN (k = 10 and 20, mean over
    the sets' seed-0 runs): one setting for every set, chosen without val."""
    def score(setting: tuple[int, float]) -> float:
        name = f"stage12_at{setting[0]}_lr{setting[1]:g}"
        return float(np.mean([runs["grid"][name]["holdout"]["top1"][k] for runs in by_set.values()
                              for k in ("10", "20")]))

    return max(itertools.product(*STAGE2_GRID.values()), key=score)


def compare(data_set: DataSet, seeds: Sequence[int], out: Path, found: dict[str, Any], unfreeze_at: int,
            backbone_lr: float) -> dict[str, list[dict[str, Any]]]:
    runs = out / "runs" / data_set.name
    records: dict[str, list[dict[str, Any]]] = {"source": [found["sources"][seed] for seed in seeds]}
    for kind in KINDS:
        folder = f"stage12_at{unfreeze_at}_lr{backbone_lr:g}_final" if kind == "stage12" else kind
        records[kind] = [
            train(data_set, runs / folder / f"seed{seed}", seed,
                  epochs_for(kind, found["budget_seconds"], found["epoch_seconds"], unfreeze_at),
                  flags_of(kind, runs / "source" / f"seed{seed}" / "checkpoint.pth", unfreeze_at, backbone_lr), True)
            for seed in seeds]
    return records


def table(data_set: DataSet, records: dict[str, list[dict[str, Any]]], found: dict[str, Any]) -> str:
    n = {split: data_set.size(split) for split in EVALUATED_SPLITS}
    source = records["source"]
    lines = [f"**{data_set.name}** ({data_set.description}; n = {n['holdout']} held out, {n['val']} val; budget "
             f"{found['budget_seconds']:.0f} s, the source's training time; seconds per epoch frozen "
             f"{found['epoch_seconds']['frozen']:.1f}, unfrozen {found['epoch_seconds']['full']:.1f})", "",
             "| run | epochs | train s | collapsed | k=10 hold | k=20 hold | linear hold | k=10 val | k=20 val | "
             "linear val |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in records.items():
        row = [name, "/".join(str(r["epochs"]) for r in runs), f"{np.mean([r['train_seconds'] for r in runs]):.0f}",
               ", ".join(r["collapse"] or "no" for r in runs)]
        for split in EVALUATED_SPLITS:
            for metric in ("k10", "k20", "linear"):
                values, reference = seed_values(runs, split, metric), seed_values(source, split, metric)
                mark = "" if name == "source" else noise_mark(float(np.mean(values) - np.mean(reference)),
                                                              binomial_sigma(float(np.mean(reference)), n[split]))
                row.append(cell(values) + mark)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + noise_note(source, n, "the source's")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("experiments.continued", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/results/continued", help="results and runs folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sets", nargs="+", default=["photos", "scenes"],
                        choices=[name for name in DATA_SETS if name != "demo"])
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    started = time.perf_counter()
    data_sets = [DATA_SETS[name](out / "data") for name in args.sets]
    found = {data_set.name: run_set(data_set, args.seeds, out) for data_set in data_sets}
    unfreeze_at, backbone_lr = choose_stage2(found)
    results: dict[str, Any] = {"seeds": args.seeds, "grid": STAGE2_GRID,
                               "chosen": {"unfreeze_at": unfreeze_at, "backbone_lr": backbone_lr}, "sets": {}}
    sections = []
    for data_set in data_sets:
        records = compare(data_set, args.seeds, out, found[data_set.name], unfreeze_at, backbone_lr)
        results["sets"][data_set.name] = {**found[data_set.name], "records": records}
        sections.append(table(data_set, records, found[data_set.name]))
    grid_lines = ["| set | " + " | ".join(found[data_sets[0].name]["grid"]) + " |",
                  "|---|" + "---|" * len(found[data_sets[0].name]["grid"])]
    for data_set in data_sets:
        grid = found[data_set.name]["grid"]
        grid_lines.append(f"| {data_set.name} | " + " | ".join(
            f"{np.mean([run['holdout']['top1'][k] for k in ('10', '20')]):.1f}" for run in grid.values()) + " |")
    notes = " ".join((
        "Runs: " + "; ".join(f"`{name}` = {text}" for name, text in DESCRIPTIONS.items()) + ".",
        "Chosen on held-out images (mean k-NN top-1 at k = 10 and 20 of seed 0, over the sets):",
        f"--unfreeze_at {unfreeze_at} --backbone_lr {backbone_lr:g}. Cells: mean (seed 0 / seed 1); ↑/↓: differs",
        "from the source by more than 2 binomial stds at the source's accuracy. 'linear': eval_linear.py's grid probe",
        "(chosen on a held-out tenth of the training part)."))
    notes += "\n\nThe stage-2 grid on held-out images (seed 0, mean of k = 10 and 20):\n\n" + "\n".join(grid_lines)
    return write_report(out, "continued", "\n\n".join([*sections, notes]), results,
                        study_command("continued", argv), time.perf_counter() - started)


if __name__ == "__main__":
    main()
