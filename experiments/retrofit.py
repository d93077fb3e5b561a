"""Retrofit against the CLS model it starts from, on two real image sets: DINO with the CLS read-out is trained
first; SPARO is then retrofitted onto its frozen blocks (``--init_from`` + ``--freeze_blocks all``); and SPARO is
trained from scratch for the wall time the retrofit took. k-NN top-1 of the teachers (k = 10 and 20) on the
held-out part of the training images and on val, two seeds.

    python -m experiments.retrofit --out experiments/results/retrofit --sets digits photos

Data (:mod:`experiments.slot_ablation` prepares both; train/ is what training sees, holdout/ and val/ are only
evaluated): scikit-learn's bundled handwritten digits, and random crops of the photos bundled with scikit-image.
Recipe: the demo preset (ViT-Tiny/8, depth 3, 32/16 px crops), on the CPU, fp32, one run at a time, one thread.

Each seed also runs the diagnosis: the k-NN of the frozen CLS model's CLS token read after the blocks the retrofit
keeps (what the retrofit's read-out has to work with), the retrofits' k-NN before their first step, and retrofit
variants that each change one thing (the last, two) of the recipe the retrofit was first measured with
(``retrofit_before``, every flag stated). The defaults of
``--freeze_blocks`` runs were chosen from the variants' held-out k-NN only; ``retrofit`` is the plain command with
those defaults. Results go to ``OUT/retrofit.md`` and ``OUT/retrofit.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import main_dino
from benchmarks.machine import summary_line
from dino_sparo.checkpoint import load_student_weights, save_atomic
from dino_sparo.train.setup import build_models, jsonable_args, resolve_args
from dino_sparo.utils.files import write_json_atomic, write_text_atomic
from experiments.slot_ablation import (
    CLS,
    KNN_KS,
    NOISE_SIGMAS,
    PAPER_READOUT,
    Config,
    DataSet,
    binomial_sigma,
    knn,
    paper_readout_with,
    prepare_digits,
    prepare_photos,
    training_argv,
)

CLS_EPOCHS = 10
RETROFIT_EPOCHS = 5
SETS: dict[str, Callable[[Path, int], DataSet]] = {"digits": prepare_digits, "photos": prepare_photos}
SPLITS = ("holdout", "val")
SPARO_GAIN_4 = paper_readout_with("--sparo_key_init_gain", "4")
RETROFIT = Config("retrofit", ("--readout", "sparo", "--freeze_blocks", "all"),
                  "SPARO retrofitted onto the CLS model (the plain command: this package's defaults)")
# The recipe the retrofit was first measured with, stated in full so that the defaults chosen here cannot change it.
RETROFIT_BEFORE = Config("retrofit_before", (*SPARO_GAIN_4, "--freeze_blocks", "all"),
                         "SPARO retrofitted onto the CLS model, the first recipe")
SCRATCH = Config("scratch", SPARO_GAIN_4, "SPARO trained from scratch")


def variant(name: str, description: str, *changes: str) -> Config:
    """``retrofit_before`` with ``changes`` (flag, value, ...): flags of :data:`PAPER_READOUT` replaced, others
    appended."""
    pairs = list(zip(changes[::2], changes[1::2]))
    readout = [item for flag, value in pairs if flag in PAPER_READOUT for item in (flag, value)]
    others = tuple(item for flag, value in pairs if flag not in PAPER_READOUT for item in (flag, value))
    return Config(name, (*paper_readout_with("--sparo_key_init_gain", "4", *readout), "--freeze_blocks", "all",
                         *others), description)


# One change each (the last combines two), from the candidate causes: which frozen features the read-out sees, its
# initial scale, its head, and the short schedule (warm-up, learning rates, teacher momentum and temperature).
VARIANTS = (
    variant("keep_last_block", "SPARO reads all the CLS model's blocks (replaces none)",
            "--readout_replace_blocks", "0"),
    variant("key_gain_1", "key projection gain 1 (smaller initial logits)", "--sparo_key_init_gain", "1"),
    variant("no_warmup", "no learning-rate warm-up", "--warmup_epochs", "0"),
    variant("lr_half", "half the learning rate", "--lr", "0.002"),
    variant("lr_double", "twice the learning rate", "--lr", "0.008"),
    variant("momentum_099", "teacher momentum 0.99 (slower teacher)", "--momentum_teacher", "0.99"),
    variant("momentum_09", "teacher momentum 0.9 (faster teacher)", "--momentum_teacher", "0.9"),
    variant("sparo_lr_mult_10", "read-out learning rate x10 (the head's unchanged)", "--sparo_lr_mult", "10"),
    # 12 slots of 16 make SPARO's output as wide as the CLS token, so the CLS model's head fits and is loaded
    variant("head_from_cls", "12 slots (192-d output), so the CLS model's head is loaded", "--sparo_slots", "12"),
    variant("teacher_temp_004", "teacher temperature 0.04", "--teacher_temp", "0.04", "--warmup_teacher_temp", "0.04"),
    # the two changes that raised held-out k-NN on some seed, together
    variant("key_gain_1_keep_last_block", "key gain 1 and SPARO reading all the blocks", "--sparo_key_init_gain", "1",
            "--readout_replace_blocks", "0"),
)
PROBE = "cls_token_of_kept_blocks"
AT_INIT = "at_init"  # suffix of a retrofit's before-the-first-step probe


def train_and_evaluate(data_set: DataSet, config: Config, seed: int, run_dir: Path, epochs: int,
                       extra: tuple[str, ...] = (), keep_checkpoint: bool = False) -> dict[str, Any]:
    """Trains ``config`` for ``epochs`` (log in ``run_dir/train.log``) and k-NN-evaluates its teacher; a run whose
    ``result.json`` exists is not repeated."""
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
        last_epoch = json.loads((run_dir / "log.txt").read_text().splitlines()[-1])
        record = {"config": config.name, "seed": seed, "epochs": epochs, "train_seconds": seconds,
                  "command": "python main_dino.py " + " ".join(argv),
                  "slots": {key: last_epoch[key] for key in ("slot_peakedness", "slot_pairwise_similarity")
                            if key in last_epoch}}
        record.update(evaluate(run_dir / "checkpoint.pth", data_set, run_dir))
    if not keep_checkpoint:
        (run_dir / "checkpoint.pth").unlink()
    write_json_atomic(record, result_path)
    return record


def evaluate(checkpoint: Path, data_set: DataSet, run_dir: Path, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """k-NN top-1 of ``checkpoint``'s teacher on both evaluated splits (``flags``: eval_knn.py model flags)."""
    record = {}
    for split in SPLITS:
        record[split] = knn(checkpoint, data_set.root / f"knn_{split}", run_dir / f"knn_{split}", per_slot=False,
                            flags=flags)
        record[split]["n"] = data_set.size(split)
    return record


def probe_kept_blocks(data_set: DataSet, cls_checkpoint: Path, run_dir: Path) -> dict[str, Any]:
    """The CLS model's CLS token after the blocks a retrofit that replaces one block keeps (its final norm
    applied): what the read-out is given, scored as the CLS model's own read-out scores it."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "eval.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        record = {"config": PROBE, **evaluate(cls_checkpoint, data_set, run_dir, ("--readout_replace_blocks", "1"))}
    write_json_atomic(record, result_path)
    return record


def probe_at_init(data_set: DataSet, config: Config, seed: int, init_from: tuple[str, ...], run_dir: Path
                  ) -> dict[str, Any]:
    """The teacher of retrofit ``config`` before its first step (read-out and head at their initialisation, blocks
    from the CLS model): how much of the retrofit's score the training of the read-out adds."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [*training_argv(data_set, config, seed, run_dir), *init_from]
    with open(run_dir / "eval.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        args = resolve_args(main_dino.parse_args(argv), True, print)
        torch.manual_seed(args.seed)
        student, _ = build_models(args, torch.device("cpu"))
        load_student_weights(student, args.init_from, args.init_from_key)
        checkpoint = run_dir / "checkpoint.pth"
        save_atomic({"teacher": student.state_dict(), "args": jsonable_args(args)}, checkpoint)
        record = {"config": config.name, **evaluate(checkpoint, data_set, run_dir)}
    checkpoint.unlink()
    write_json_atomic(record, result_path)
    return record


def run_seed(data_set: DataSet, seed: int, out: Path) -> dict[str, dict[str, Any]]:
    """The teachers of one seed (the CLS checkpoint is kept for retrofits added later); the scratch run gets as
    many epochs as fit in the retrofit's wall time, from the CLS run's time per epoch (a full step of either
    read-out costs about the same)."""
    runs = out / "runs" / data_set.name / f"seed{seed}"
    cls = train_and_evaluate(data_set, CLS, seed, runs / "cls", CLS_EPOCHS, keep_checkpoint=True)
    init_from = ("--init_from", str(runs / "cls" / "checkpoint.pth"))
    records = {"cls": cls, PROBE: probe_kept_blocks(data_set, runs / "cls" / "checkpoint.pth", runs / PROBE),
               **{f"{config.name}_{AT_INIT}": probe_at_init(data_set, config, seed, init_from,
                                                           runs / f"{config.name}_{AT_INIT}")
                  for config in (RETROFIT_BEFORE, RETROFIT)}}
    for config in (RETROFIT_BEFORE, *VARIANTS, RETROFIT):
        records[config.name] = train_and_evaluate(data_set, config, seed, runs / config.name, RETROFIT_EPOCHS,
                                                  init_from)
    seconds_per_epoch = cls["train_seconds"] / CLS_EPOCHS
    scratch_epochs = max(1, round(records[RETROFIT.name]["train_seconds"] / seconds_per_epoch))
    records["scratch"] = train_and_evaluate(data_set, SCRATCH, seed, runs / "scratch", scratch_epochs)
    return records


def mean_top1(runs: list[dict[str, Any]], split: str, k: str) -> float:
    return float(np.mean([run[split]["top1"][k] for run in runs]))


def table(name: str, by_seed: list[dict[str, dict[str, Any]]], labels: dict[str, str]) -> str:
    """One row per teacher of ``labels``: means over seeds (each seed), the mean marked ↑/↓ where it differs from
    the CLS model's by more than :data:`NOISE_SIGMAS` binomial stds of the CLS model's score."""
    rows = ["| set | teacher | epochs | train s | held-out k=10 | held-out k=20 | val k=10 | val k=20 |",
            "|---|---|---|---|---|---|---|---|"]
    cls_runs = [seed["cls"] for seed in by_seed]
    for key, label in labels.items():
        runs = [seed[key] for seed in by_seed]
        scores = []
        for split in SPLITS:
            for k in KNN_KS:
                values = [run[split]["top1"][k] for run in runs]
                delta = float(np.mean(values)) - mean_top1(cls_runs, split, k)
                sigma = binomial_sigma(mean_top1(cls_runs, split, k), runs[0][split]["n"])
                mark = " ↑" if delta > NOISE_SIGMAS * sigma else " ↓" if delta < -NOISE_SIGMAS * sigma else ""
                scores.append(f"{np.mean(values):.1f} ({' / '.join(f'{v:.1f}' for v in values)}){mark}")
        epochs = "/".join(str(run["epochs"]) for run in runs) if "epochs" in runs[0] else "—"
        seconds = (f"{np.mean([run['train_seconds'] for run in runs]):.0f}" if "train_seconds" in runs[0] else "—")
        rows.append(f"| {name} | {label} | {epochs} | {seconds} | " + " | ".join(scores) + " |")
    return "\n".join(rows)


def noise_line(name: str, by_seed: list[dict[str, dict[str, Any]]]) -> str:
    cls_runs = [seed["cls"] for seed in by_seed]
    parts = [f"{split} n = {cls_runs[0][split]['n']}, σ = "
             + "/".join(f"{binomial_sigma(mean_top1(cls_runs, split, k), cls_runs[0][split]['n']):.1f}"
                        for k in KNN_KS) for split in SPLITS]
    return f"- {name}: " + "; ".join(parts) + " points (k=10/20, at the CLS model's score)"


MAIN_LABELS = {"cls": "DINO, CLS read-out (trained first)",
               RETROFIT_BEFORE.name: "SPARO retrofitted, first recipe",
               RETROFIT.name: "SPARO retrofitted, current defaults",
               f"{RETROFIT.name}_{AT_INIT}": "the same before its first step",
               "scratch": "SPARO from scratch, same wall time as the retrofit"}
DIAGNOSIS_LABELS = {"cls": "DINO, CLS read-out (the bar)",
                    PROBE: "its CLS token after the 2 blocks a retrofit keeps",
                    f"{RETROFIT_BEFORE.name}_{AT_INIT}": "retrofit, first recipe, before its first step",
                    RETROFIT_BEFORE.name: "retrofit, first recipe",
                    **{config.name: f"retrofit: {config.description}" for config in VARIANTS}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/retrofit"))
    parser.add_argument("--sets", nargs="+", choices=tuple(SETS), default=list(SETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one avoids the spin-waiting of two on shared cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    by_set = {}
    for name in args.sets:
        data_set = SETS[name](args.out / "data", CLS_EPOCHS)
        by_set[name] = [run_seed(data_set, seed, args.out) for seed in args.seeds]
    main_rows = [table(name, by_seed, MAIN_LABELS).splitlines()[2 if index else 0:] for index, (name, by_seed)
                 in enumerate(by_set.items())]
    diagnosis_rows = [table(name, by_seed, DIAGNOSIS_LABELS).splitlines()[2 if index else 0:]
                      for index, (name, by_seed) in enumerate(by_set.items())]
    text = "\n".join([
        "\n".join(line for rows in main_rows for line in rows), "",
        f"Means over seeds {', '.join(map(str, args.seeds))} (each seed); ↑/↓: differs from the CLS model's mean by "
        f"more than {NOISE_SIGMAS:g} binomial stds sqrt(p(1-p)/n):",
        *(noise_line(name, by_seed) for name, by_seed in by_set.items()), "",
        "Diagnosis (held-out chooses; each variant changes one thing of the first recipe but the last, which "
        "combines two; 5 epochs):", "",
        "\n".join(line for rows in diagnosis_rows for line in rows), "",
        f"Machine: {summary_line()}; {time.perf_counter() - started:.0f} s "
        f"(this invocation; finished runs are reused)."])
    print(text)
    write_text_atomic(text + "\n", args.out / "retrofit.md")
    write_json_atomic(by_set, args.out / "retrofit.json")


if __name__ == "__main__":
    main()
