"""Which slot knows what? SPARO (defaults, stated explicitly) and CLS at the same budget, two seeds, on two data
sets with several labels per image: the slot x attribute matrix, the specialisation scores, and the paper's
concept selection made for each attribute in turn and read on all of them.

    python -m experiments.which_slot --out experiments/results/which_slot

Data (prepared by :mod:`experiments.slot_ablation` under ``WORK/data``; training sees its ``train/`` part):
- ``demo``: the generated shapes; attributes shape, colour, size, position (the quadrant of the object's centre,
  from the generator's x, y) and background, from the generator's ``attributes.csv``. n val = 500.
- ``digits``: scikit-learn's real 8x8 handwritten-digit scans; attributes digit and three numbers measured on the
  8x8 scan, binned by eval_knn.py into 4 quantiles of the training images: ink (sum of the grey levels), slant
  (the ink's x-y covariance over its y variance: > 0 leans right) and width (the ink's x standard deviation).
  n val = 540.
Every run: the demo recipe (``--demo``), on the CPU, fp32, one torch thread. Evaluation: eval_knn.py on val against
the training part, k = 10 and 20; the selection keeps K = 4 of the 16 slots (fixed before running), chosen on a
held-out 10 % of the training part (``--select_holdout 0.1 --seed 0``); val labels never choose anything.
Per run: ``WORK/runs/<set>/<config>/seed<S>/`` (``--work``, default ``<cache>/which_slot``, outside the tree); a run
with ``result.json`` is reused. Results: ``OUT/which_slot.md`` and ``.json``, and the heat maps
``OUT/<set>_seed<S>_k20.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

import eval_knn
import main_dino
from benchmarks.machine import summary_line
from dino_sparo.data.demo import default_cache_dir
from dino_sparo.data.images import images_under
from experiments.slot_ablation import (
    CROP_SIZE,
    RESIZE_SIZE,
    Config,
    DataSet,
    binomial_sigma,
    prepare_demo,
    prepare_digits,
    training_argv,
)

SPARO = Config("sparo", ("--readout", "sparo", "--sparo_key_init_gain", "4", "--sparo_query_init_std", "1",
                         "--sparo_lr_mult", "1", "--sparo_weight_decay", "true", "--sparo_logit_scale", "false"),
               "SPARO with today's defaults, stated explicitly")
CLS = Config("cls", ("--readout", "cls"), "DINO's CLS read-out")
EPOCHS = {"demo": 6, "digits": 10}
ATTRIBUTES = {"demo": ["shape", "colour", "size", "position", "background"],
              "digits": ["digit", "ink", "slant", "width"]}
SELECT_K = 4
KS = ("10", "20")
NOISE_SIGMAS = 2.0


def demo_attributes(data_set: DataSet, work: Path) -> Path:
    """attributes.csv for ``knn_val/`` (paths train/..., val/...), from the generator's own table."""
    with open(work / "data" / "demo_generated" / "attributes.csv", newline="") as handle:
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


def evaluate(checkpoint: Path, data_set: DataSet, table: Path, columns: list[str], output: Path,
             *extra: str) -> dict[str, Any]:
    argv = ["--pretrained_weights", str(checkpoint), "--data_path", str(data_set.root / "knn_val"),
            "--resize_size", str(RESIZE_SIZE), "--crop_size", str(CROP_SIZE), "--nb_knn", *KS, "--num_workers", "0",
            "--use_cuda", "false", "--attributes", str(table), "--attribute_columns", ",".join(columns),
            "--output_dir", str(output), *extra]
    output.mkdir(parents=True, exist_ok=True)
    return eval_knn.main(argv)


def run(data_set: DataSet, table: Path, config: Config, seed: int, work: Path) -> dict[str, Any]:
    run_dir = work / "runs" / data_set.name / config.name / f"seed{seed}"
    if (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = training_argv(data_set, config, seed, run_dir)
    columns = ATTRIBUTES[data_set.name]
    record: dict[str, Any] = {"config": config.name, "seed": seed, "command": "python main_dino.py " + " ".join(argv)}
    started = time.perf_counter()
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        main_dino.main(argv)
        record["train_seconds"] = time.perf_counter() - started
        checkpoint, features = run_dir / "checkpoint.pth", run_dir / "features"
        plain = evaluate(checkpoint, data_set, table, columns, run_dir / "eval", "--dump_features", str(features))
        record["attributes"] = plain["attributes"]
        if config is SPARO:
            cls_checkpoint = work / "runs" / data_set.name / CLS.name / f"seed{seed}" / "checkpoint.pth"
            reuse = ("--load_features", str(features))
            for k in KS:
                record[f"matrix_k{k}"] = evaluate(checkpoint, data_set, table, columns, run_dir / f"matrix_k{k}",
                                                  *reuse, "--per_slot", "--slot_knn", k, "--compare_weights",
                                                  str(cls_checkpoint))["slot_attributes"]
            record["selection"] = {
                target: evaluate(checkpoint, data_set, table, columns, run_dir / "selection", *reuse,
                                 "--select_slots", str(SELECT_K), "--select_for", target, "--slot_knn", "20",
                                 "--select_holdout", "0.1", "--seed", "0")["selection_for"]
                for target in columns}
    record["seconds"] = time.perf_counter() - started
    shutil.rmtree(features, ignore_errors=True)
    (run_dir / "result.json").write_text(json.dumps(record, indent=1))
    return record


def cell(values: list[float], digits: int = 1, sign: str = "") -> str:
    return f"{np.mean(values):{sign}.{digits}f} ({' / '.join(f'{v:{sign}.{digits}f}' for v in values)})"


def report(name: str, records: dict[str, list[dict[str, Any]]]) -> str:
    columns = ATTRIBUTES[name]
    sparo, cls = records[SPARO.name], records[CLS.name]
    n = sparo[0]["matrix_k20"]["val_images"]
    lines = [f"### {name} (n = {n} val images; cells: mean over seeds (seed 0 / seed 1))", "",
             "Whole encodings, val top-1 per attribute, and chance (the most frequent val label):", "",
             "| attribute | chance | k | SPARO all slots | CLS | binomial std |", "|---|---|---|---|---|---|"]
    for column in columns:
        for k in KS:
            s = [r["attributes"][column]["knn"][k]["top1"] for r in sparo]
            c = [r["attributes"][column]["knn"][k]["top1"] for r in cls]
            lines.append(f"| {column} | {sparo[0]['attributes'][column]['chance']:.1f} | {k} | {cell(s)} | "
                         f"{cell(c)} | {binomial_sigma(float(np.mean(s)), n):.1f} |")
    lines += ["", "Specialisation: best single slot minus median slot (points), and the mean rank correlation "
              "between attributes across slots:", "",
              "| k | " + " | ".join(columns) + " | mean rank corr. |", "|---|" + "---|" * (len(columns) + 1)]
    for k in KS:
        spec = [" | ".join(cell([r[f"matrix_k{k}"]["specialisation"][c] for r in sparo]) for c in columns)]
        corr = [r[f"matrix_k{k}"]["mean_rank_correlation"] for r in sparo]
        lines.append(f"| {k} | {spec[0]} | {cell(corr, 2)} |")
    lines += ["", f"Selection: the {SELECT_K} slots best at the row's attribute (held-out train images), val top-1 "
              f"of those slots minus all 16 slots, k = 10 and 20. ↑/↓: the mean change exceeds {NOISE_SIGMAS:.0f} "
              f"binomial stds of the all-slot accuracy.", "",
              "| selected for | k | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for target in columns:
        for k in KS:
            cells = []
            for column in columns:
                deltas = [r["selection"][target]["per_attribute"][column]["selected"][k]
                          - r["selection"][target]["per_attribute"][column]["all_slots"][k] for r in sparo]
                every = np.mean([r["selection"][target]["per_attribute"][column]["all_slots"][k] for r in sparo])
                mark = "↑" if np.mean(deltas) > NOISE_SIGMAS * binomial_sigma(every, n) else (
                    "↓" if np.mean(deltas) < -NOISE_SIGMAS * binomial_sigma(every, n) else "")
                cells.append(cell(deltas, sign="+") + (f" {mark}" if mark else ""))
            lines.append(f"| {target} | {k} | " + " | ".join(cells) + " |")
    chosen = "; ".join(f"{t}: " + " / ".join(",".join(map(str, r["selection"][t]["selected"])) for r in sparo)
                       for t in columns)
    lines += ["", f"Slots chosen (seed 0 / seed 1): {chosen}.", "",
              "Train seconds per run: SPARO " + cell([r["train_seconds"] for r in sparo], 0)
              + ", CLS " + cell([r["train_seconds"] for r in cls], 0) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/which_slot"))
    parser.add_argument("--work", type=Path, default=Path(default_cache_dir()) / "which_slot",
                        help="data and runs (checkpoints, logs); reused when the command is repeated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    demo = prepare_demo(args.work / "data", EPOCHS["demo"])
    digits = prepare_digits(args.work / "data", EPOCHS["digits"])
    tables = {"demo": demo_attributes(demo, args.work), "digits": digits_attributes(digits)}
    results, sections = {}, []
    for data_set in (demo, digits):
        records = {config.name: [run(data_set, tables[data_set.name], config, seed, args.work) for seed in args.seeds]
                   for config in (CLS, SPARO)}  # CLS first: its checkpoint is the matrix's CLS row
        for seed in args.seeds:
            shutil.copyfile(args.work / "runs" / data_set.name / SPARO.name / f"seed{seed}" / "matrix_k20"
                            / "knn_slot_attributes.png", args.out / f"{data_set.name}_seed{seed}_k20.png")
        results[data_set.name] = records
        sections.append(report(data_set.name, records))
    text = "\n\n".join(sections) + (
        f"\n\nConfigurations: `sparo` = `{' '.join(SPARO.flags)}`; `cls` = `{' '.join(CLS.flags)}`; both with "
        f"`--demo`, {EPOCHS['demo']} epochs (demo) / {EPOCHS['digits']} (digits), seeds {args.seeds}.\n"
        f"Machine: {summary_line()}; "
        f"{time.perf_counter() - started:.0f} s in total.")
    print(text)
    (args.out / "which_slot.md").write_text(text + "\n")
    (args.out / "which_slot.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
