"""Retrofit against training from scratch, on real images: DINO with the CLS read-out is trained first; SPARO is
then retrofitted onto its frozen blocks (``--init_from`` + ``--freeze_blocks all``); and SPARO is trained from
scratch for the wall time the retrofit took. k-NN top-1 of the three teachers (k = 10 and 20) on the held-out part
of the training images and on val, two seeds.

    python -m experiments.retrofit --out experiments/results/retrofit

Data: scikit-learn's bundled handwritten digits, prepared by :mod:`experiments.slot_ablation` (its train/ split is
what training sees; holdout/ and val/ are only evaluated). Recipe: the demo preset (ViT-Tiny/8, depth 3, 32/16 px
crops), on the CPU, fp32, one run at a time. Both SPARO read-outs state their flags: the paper's read-out with the
key gain of 4 that the results were measured with (the package default then). Results go to ``OUT/retrofit.md``
and ``OUT/retrofit.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import main_dino
from dino_sparo.utils.files import write_json_atomic, write_text_atomic
from dino_sparo.utils.machine import summary_line
from experiments.slot_ablation import (
    CLS,
    KNN_KS,
    Config,
    DataSet,
    knn,
    paper_readout_with,
    prepare_digits,
    training_argv,
)

CLS_EPOCHS = 10
RETROFIT_EPOCHS = 5
SPARO_GAIN_4 = paper_readout_with("--sparo_key_init_gain", "4")
RETROFIT = Config("retrofit", (*SPARO_GAIN_4, "--freeze_blocks", "all"), "SPARO retrofitted onto the CLS model")
SCRATCH = Config("scratch", SPARO_GAIN_4, "SPARO trained from scratch")


def train_and_evaluate(data_set: DataSet, config: Config, seed: int, run_dir: Path, epochs: int,
                       extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Trains ``config`` for ``epochs`` (log in ``run_dir/train.log``) and k-NN-evaluates its teacher."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = training_argv(DataSet(data_set.name, data_set.root, data_set.description, epochs), config, seed, run_dir)
    argv += list(extra)
    started = time.perf_counter()
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        main_dino.main(argv)
        seconds = time.perf_counter() - started
        record = {"config": config.name, "seed": seed, "epochs": epochs, "train_seconds": seconds,
                  "command": "python main_dino.py " + " ".join(argv)}
        for split in ("holdout", "val"):
            record[split] = knn(run_dir / "checkpoint.pth", data_set.root / f"knn_{split}", run_dir / f"knn_{split}",
                                per_slot=False)
            record[split]["n"] = data_set.size(split)
    write_json_atomic(record, result_path)
    return record


def run_seed(data_set: DataSet, seed: int, out: Path) -> dict[str, dict[str, Any]]:
    """The three teachers of one seed; the scratch run gets as many epochs as fit in the retrofit's wall time,
    from the CLS run's time per epoch (a full step of either read-out costs about the same)."""
    runs = out / "runs" / f"seed{seed}"
    cls = train_and_evaluate(data_set, CLS, seed, runs / "cls", CLS_EPOCHS)
    retrofit = train_and_evaluate(data_set, RETROFIT, seed, runs / "retrofit", RETROFIT_EPOCHS,
                                  ("--init_from", str(runs / "cls" / "checkpoint.pth")))
    seconds_per_epoch = cls["train_seconds"] / CLS_EPOCHS
    scratch_epochs = max(1, round(retrofit["train_seconds"] / seconds_per_epoch))
    scratch = train_and_evaluate(data_set, SCRATCH, seed, runs / "scratch", scratch_epochs)
    return {"cls": cls, "retrofit": retrofit, "scratch": scratch}


def table(by_seed: list[dict[str, dict[str, Any]]]) -> str:
    rows = ["| teacher | epochs | train s | held-out top-1 k=10 | k=20 | val top-1 k=10 | k=20 |",
            "|---|---|---|---|---|---|---|"]
    labels = {"cls": "DINO, CLS read-out (trained first)", "retrofit": "SPARO retrofitted on its frozen blocks",
              "scratch": "SPARO from scratch, same wall time as the retrofit"}
    for name, label in labels.items():
        runs = [seed[name] for seed in by_seed]

        def cell(values: list[float], digits: int = 1) -> str:
            return f"{np.mean(values):.{digits}f} ({' / '.join(f'{v:.{digits}f}' for v in values)})"

        scores = [cell([run[split]["top1"][k] for run in runs]) for split in ("holdout", "val") for k in KNN_KS]
        rows.append(f"| {label} | {'/'.join(str(run['epochs']) for run in runs)} | "
                    f"{cell([run['train_seconds'] for run in runs], 0)} | " + " | ".join(scores) + " |")
    n = {split: by_seed[0]["cls"][split]["n"] for split in ("holdout", "val")}
    return "\n".join(rows) + f"\n\nn: held-out {n['holdout']}, val {n['val']} images; means over seeds (each seed)."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/retrofit"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    data_set = prepare_digits(args.out / "data", CLS_EPOCHS)
    started = time.perf_counter()
    by_seed = [run_seed(data_set, seed, args.out) for seed in args.seeds]
    text = f"{table(by_seed)}\n\nMachine: {summary_line()}; {time.perf_counter() - started:.0f} s."
    print(text)
    write_text_atomic(text + "\n", args.out / "retrofit.md")
    write_json_atomic(by_seed, args.out / "retrofit.json")


if __name__ == "__main__":
    main()
