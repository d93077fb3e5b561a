"""Which slot knows what? SPARO (defaults, stated explicitly) and CLS at the same budget, two seeds, on two data
sets with several labels per image: the slot x attribute matrix, the specialisation scores, and the paper's
concept selection made for each attribute in turn and read on all of them.

    python -m experiments.which_slot --out experiments/results/which_slot

Data (:mod:`experiments.base.data`, prepared under ``WORK/data``; training sees its ``train/`` part):
- ``demo``: the generated shapes; attributes shape, colour, size, position (the quadrant of the object's centre,
  from the generator's x, y) and background, from the generator's ``attributes.csv``. n val = 500.
- ``digits``: scikit-learn's real 8x8 handwritten-digit scans; attributes digit and three numbers measured on the
  8x8 scan, binned by eval_knn.py into 4 quantiles of the training images: ink (sum of the grey levels), slant
  (the ink's x-y covariance over its y variance: > 0 leans right) and width (the ink's x standard deviation).
  n val = 540.
Every run: the demo recipe (configs/demo.yaml), on the CPU, fp32, one torch thread. Evaluation: eval_knn.py on val
against the training part, k = 10 and 20; the selection keeps K = 4 of the 16 slots (fixed before running), chosen on a
held-out 10 % of the training part (``--select_holdout 0.1 --seed 0``); val labels never choose anything.
Per run: ``WORK/runs/<set>/<config>/seed<S>/`` (``--work``, default ``<cache>/which_slot``, outside the tree); a run
with ``result.json`` is reused. Results: ``OUT/which_slot.md`` and ``.json``, and the heat maps
``OUT/<set>_seed<S>_k20.png``.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

from dino_sparo.data.demo import default_cache_dir
from dino_sparo.data.images import images_under

from .base.data import DataSet, prepare_demo, prepare_digits
from .base.evaluation import KNN_KS, run_eval_knn
from .base.report import NOISE_SIGMAS, binomial_sigma, cell, noise_mark, study_command, write_report
from .base.runs import DINO_CLS, Configuration, cached_run, flag_words, training_run

SPARO = Configuration("sparo", {"readout": "sparo", "sparo_key_init_gain": 4, "sparo_query_init_std": 1,
                                "sparo_lr_mult": 1}, "SPARO with today's defaults, stated explicitly")
CLS = Configuration("cls", DINO_CLS, "DINO's CLS read-out")
EPOCHS = {"demo": 6, "digits": 10}
ATTRIBUTES = {"demo": ["shape", "colour", "size", "position", "background"],
              "digits": ["digit", "ink", "slant", "width"]}
SELECT_K = 4


def demo_attributes(data_set: DataSet) -> Path:
    """attributes.csv for ``knn_val/`` (paths train/..., val/...), from the generator's own table."""
    with open(data_set.source / "attributes.csv", newline="") as handle:
        source = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    path = data_set.root / "attributes.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *ATTRIBUTES["demo"]])
        for split in ("train", "val"):
            for image in images_under(str(data_set.root / split)):
                row = source[Path(image).name]
                position = ("top" if float(row["y"]) < 0.5 else "bottom") + "-" + (
                    "left" if float(row["x"]) < 0.5 else "right")
                writer.writerow([f"{split}/{Path(image).parent.name}/{Path(image).name}", row["shape"],
                                 row["colour"], row["size"], position, row["background"]])
    return path


def digit_measures(scan: np.ndarray) -> tuple[float, float, float]:
    """(ink, slant, width) of one 8x8 scan, from the grey levels as weights."""
    ys, xs = np.mgrid[0:8, 0:8]
    weights = scan / scan.sum()
    mean_x, mean_y = (weights * xs).sum(), (weights * ys).sum()
    var_y = (weights * (ys - mean_y) ** 2).sum()
    cov = (weights * (xs - mean_x) * (ys - mean_y)).sum()
    # image y grows downwards: a right-leaning stroke has x falling as y grows, so slant = -cov / var_y
    return float(scan.sum()), float(-cov / var_y), float(np.sqrt((weights * (xs - mean_x) ** 2).sum()))


def digits_attributes(data_set: DataSet) -> Path:
    digits = load_digits()
    path = data_set.root / "attributes.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *ATTRIBUTES["digits"]])
        for split in ("train", "val"):
            for image in images_under(str(data_set.root / split)):
                index = int(Path(image).stem)
                ink, slant, width = digit_measures(digits.images[index])
                # the digit as text ("d7"): a numeric column would be binned into quantiles like the measures
                writer.writerow([f"{split}/{Path(image).parent.name}/{Path(image).name}", f"d{digits.target[index]}",
                                 f"{ink:.1f}", f"{slant:.4f}", f"{width:.4f}"])
    return path


def evaluate(checkpoint: Path, data_set: DataSet, table: Path, output: Path, per_slot: bool = False,
             **flags: Any) -> dict[str, Any]:
    """eval_knn.py on val against the training part, with the set's attributes as label sets."""
    return run_eval_knn(checkpoint, data_set.root / "knn_val", output, per_slot, {
        "attributes": table, "attribute_columns": ",".join(ATTRIBUTES[data_set.name]), **flags})


def run(data_set: DataSet, table: Path, config: Configuration, seed: int, work: Path) -> dict[str, Any]:
    """Trains ``config`` and reads its attributes: whole encodings and, for SPARO, the slot x attribute matrix
    (with the CLS run of the seed as a row) and the selection made for each attribute."""
    run_dir = work / "runs" / data_set.name / config.name / f"seed{seed}"

    def measure() -> dict[str, Any]:
        training = training_run(data_set, run_dir, seed, EPOCHS[data_set.name], config.flags)
        started = time.perf_counter()
        record: dict[str, Any] = {"config": config.name, "seed": seed, **training.train()}
        checkpoint, features = training.checkpoint, run_dir / "features"
        record["attributes"] = evaluate(checkpoint, data_set, table, run_dir / "eval",
                                        dump_features=features)["attributes"]
        if config.name == SPARO.name:
            cls_checkpoint = work / "runs" / data_set.name / CLS.name / f"seed{seed}" / "checkpoint.pth"
            for k in KNN_KS:
                record[f"matrix_k{k}"] = evaluate(checkpoint, data_set, table, run_dir / f"matrix_k{k}", True,
                                                  load_features=features, slot_knn=k,
                                                  compare_weights=cls_checkpoint)["slot_attributes"]
            record["selection"] = {
                target: evaluate(checkpoint, data_set, table, run_dir / "selection", load_features=features,
                                 select_slots=SELECT_K, select_for=target, slot_knn=20, select_holdout=0.1,
                                 seed=0)["selection_for"]
                for target in ATTRIBUTES[data_set.name]}
        record["seconds"] = time.perf_counter() - started
        shutil.rmtree(features, ignore_errors=True)
        return record

    return cached_run(run_dir, measure)


def report(name: str, records: dict[str, list[dict[str, Any]]]) -> str:
    columns = ATTRIBUTES[name]
    sparo, cls = records[SPARO.name], records[CLS.name]
    n = sparo[0]["matrix_k20"]["val_images"]
    lines = [f"### {name} (n = {n} val images; cells: mean over seeds (seed 0 / seed 1))", "",
             "Whole encodings, val top-1 per attribute, and chance (the most frequent val label):", "",
             "| attribute | chance | k | SPARO all slots | CLS | binomial std |", "|---|---|---|---|---|---|"]
    for column in columns:
        for k in KNN_KS:
            s = [r["attributes"][column]["knn"][k]["top1"] for r in sparo]
            c = [r["attributes"][column]["knn"][k]["top1"] for r in cls]
            lines.append(f"| {column} | {sparo[0]['attributes'][column]['chance']:.1f} | {k} | {cell(s)} | "
                         f"{cell(c)} | {binomial_sigma(float(np.mean(s)), n):.1f} |")
    lines += ["", "Specialisation: best single slot minus median slot (points), and the mean rank correlation "
              "between attributes across slots:", "",
              "| k | " + " | ".join(columns) + " | mean rank corr. |", "|---|" + "---|" * (len(columns) + 1)]
    for k in KNN_KS:
        spec = [" | ".join(cell([r[f"matrix_k{k}"]["specialisation"][c] for r in sparo]) for c in columns)]
        corr = [r[f"matrix_k{k}"]["mean_rank_correlation"] for r in sparo]
        lines.append(f"| {k} | {spec[0]} | {cell(corr, 2)} |")
    lines += ["", f"Selection: the {SELECT_K} slots best at the row's attribute (held-out train images), val top-1 "
              f"of those slots minus all 16 slots, k = 10 and 20. ↑/↓: the mean change exceeds {NOISE_SIGMAS:.0f} "
              f"binomial stds of the all-slot accuracy.", "",
              "| selected for | k | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for target in columns:
        for k in KNN_KS:
            cells = []
            for column in columns:
                deltas = [r["selection"][target]["per_attribute"][column]["selected"][k]
                          - r["selection"][target]["per_attribute"][column]["all_slots"][k] for r in sparo]
                every = np.mean([r["selection"][target]["per_attribute"][column]["all_slots"][k] for r in sparo])
                cells.append(cell(deltas, sign="+") + noise_mark(float(np.mean(deltas)), binomial_sigma(every, n)))
            lines.append(f"| {target} | {k} | " + " | ".join(cells) + " |")
    chosen = "; ".join(f"{t}: " + " / ".join(",".join(map(str, r["selection"][t]["selected"])) for r in sparo)
                       for t in columns)
    lines += ["", f"Slots chosen (seed 0 / seed 1): {chosen}.", "",
              "Train seconds per run: SPARO " + cell([r["train_seconds"] for r in sparo], 0)
              + ", CLS " + cell([r["train_seconds"] for r in cls], 0) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/which_slot"))
    parser.add_argument("--work", type=Path, default=Path(default_cache_dir()) / "which_slot",
                        help="data and runs (checkpoints, logs); reused when the command is repeated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    demo, digits = prepare_demo(args.work / "data"), prepare_digits(args.work / "data")
    tables = {"demo": demo_attributes(demo), "digits": digits_attributes(digits)}
    results, sections = {}, []
    for data_set in (demo, digits):
        records = {config.name: [run(data_set, tables[data_set.name], config, seed, args.work) for seed in args.seeds]
                   for config in (CLS, SPARO)}  # CLS first: its checkpoint is the matrix's CLS row
        for seed in args.seeds:
            shutil.copyfile(args.work / "runs" / data_set.name / SPARO.name / f"seed{seed}" / "matrix_k20"
                            / "knn_slot_attributes.png", args.out / f"{data_set.name}_seed{seed}_k20.png")
        results[data_set.name] = records
        sections.append(report(data_set.name, records))
    configurations = (f"Configurations: `sparo` = `{' '.join(flag_words(SPARO.flags))}`; `cls` = "
                      f"`{' '.join(flag_words(CLS.flags))}`; both with the demo recipe (`--config demo`), "
                      f"{EPOCHS['demo']} epochs (demo) / {EPOCHS['digits']} (digits), seeds {args.seeds}.")
    return write_report(args.out, "which_slot", "\n\n".join([*sections, configurations]),
                        {"seeds": args.seeds, "sets": results}, study_command("which_slot", argv),
                        time.perf_counter() - started)


if __name__ == "__main__":
    main()
