"""Which read-out? Every registered read-out (and SPARO with 4 registers) trained with one DINO recipe at equal
budget, two seeds, on the generated demo set and on real scans (scikit-learn's digits).

    python -m experiments.readouts --out experiments/results/readouts

The data sets, their held-out part of the training images and the k-NN view are those of
:mod:`experiments.slot_ablation` (written under ``OUT/data``). Every run trains with the demo recipe
(``main_dino.DEMO_PRESET``: ViT-Tiny/8, depth 3, 32/16 px crops) on the training part only, with each read-out's
flags written out in full (:data:`CONFIGS`), so a later change of a default cannot change what is measured. Per run:
k-NN top-1 (k = 10, 20) of the teacher on the held-out images and on val; a linear probe on val (its recipe,
:data:`PROBE_FLAGS`, has the learning rate that did best of 0.1, 1 and 10 on the digits' held-out images, for a
CLS and a SPARO model trained 3 epochs); for read-outs with attention maps, the slot statistics and the artefact
share on those images. The step time of every read-out is measured apart, in one process,
interleaved, relative to CLS. Runs whose ``result.json`` exists are not repeated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import eval_linear
import main_dino
from benchmarks.machine import summary_line
from dino_sparo.data.datasets import ImageDataset, evenly_spaced, ordered_loader
from dino_sparo.data.transforms import eval_transform
from dino_sparo.eval.slot_stats import measure_slots
from dino_sparo.loss import DINOLoss
from dino_sparo.models.config import build_pretrained_backbone
from dino_sparo.optim import build_optimizer, get_params_groups
from dino_sparo.train.setup import build_models
from dino_sparo.train.step import TrainStep
from dino_sparo.utils.files import write_json_atomic, write_text_atomic

from .slot_ablation import (
    CROP_SIZE,
    KNN_KS,
    RESIZE_SIZE,
    STATISTICS_IMAGES,
    DataSet,
    binomial_sigma,
    knn,
    prepare_demo,
    prepare_digits,
    training_argv,
)

# A linear probe that fits these small sets in a few epochs: SGD as eval_linear.py, lr 0.1 x batch / 256.
PROBE_FLAGS = ("--epochs", "10", "--lr", "0.1", "--batch_size_per_gpu", "128", "--num_workers", "0")
TIMING_STEPS = 6
NOISE_SIGMAS = 2.0


@dataclass(frozen=True)
class Config:
    name: str
    flags: tuple[str, ...]
    description: str


SPARO_FLAGS = ("--readout", "sparo", "--readout_replace_blocks", "1", "--sparo_slots", "16", "--sparo_slot_dim", "16",
               "--sparo_attn_dim", "16", "--sparo_key_init_gain", "4", "--sparo_query_init_std", "1",
               "--sparo_share_kv", "true", "--sparo_slot_norm", "true", "--sparo_logit_scale", "false",
               "--sparo_lr_mult", "1", "--sparo_weight_decay", "true")
CONFIGS = (
    Config("cls", ("--readout", "cls", "--readout_replace_blocks", "0"), "DINO's CLS token of the last block"),
    Config("gap", ("--readout", "gap", "--readout_replace_blocks", "0"), "mean of the final patch tokens"),
    Config("sparo", SPARO_FLAGS + ("--num_registers", "0"), "16 SPARO slots of 16 dims replacing the last block"),
    Config("sparo_reg4", SPARO_FLAGS + ("--num_registers", "4"), "SPARO as above, the backbone with 4 registers"),
    Config("map", ("--readout", "map", "--readout_replace_blocks", "0", "--map_heads", "3", "--map_mlp_ratio", "4"),
           "MAP: one latent query, 3 heads, MLP x4, on top of every block"),
    Config("simpool", ("--readout", "simpool", "--readout_replace_blocks", "0", "--simpool_heads", "1",
                       "--simpool_gamma", "1.25"), "SimPool, gamma 1.25, one head, on top of every block"),
)


def slot_statistics(checkpoint: Path, images_dir: Path) -> dict[str, float] | None:
    """The read-out's map statistics (with the artefact shares) on up to 256 images of ``images_dir``; None for a
    read-out without maps."""
    model, _ = build_pretrained_backbone(str(checkpoint), "teacher", {}, log=None)
    if not model.readout_module.has_attention_maps:
        return None
    images = ImageDataset(str(images_dir), eval_transform(RESIZE_SIZE, CROP_SIZE))
    loader = ordered_loader(evenly_spaced(images, STATISTICS_IMAGES), batch_size=128, num_workers=0)
    return measure_slots(model, (batch for batch, _ in loader), "cpu").summary()


def linear_probe(checkpoint: Path, knn_root: Path, output_dir: Path) -> float:
    results = eval_linear.main(["--pretrained_weights", str(checkpoint), "--data_path", str(knn_root),
                                "--resize_size", str(RESIZE_SIZE), "--crop_size", str(CROP_SIZE),
                                "--output_dir", str(output_dir), *PROBE_FLAGS])
    return results["history"][-1]["test_acc1"]


def run(data_set: DataSet, config: Config, seed: int, run_dir: Path) -> dict[str, Any]:
    """Trains one read-out and evaluates it (``run_dir/result.json``; the training output in ``train.log``)."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = training_argv(data_set, config, seed, run_dir)
    record: dict[str, Any] = {"data_set": data_set.name, "config": config.name, "seed": seed,
                              "command": "python main_dino.py " + " ".join(argv)}
    started = time.perf_counter()
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        main_dino.main(argv)
        record["train_seconds"] = time.perf_counter() - started
        checkpoint = run_dir / "checkpoint.pth"
        for split in ("holdout", "val"):
            knn_root = data_set.root / f"knn_{split}"
            record[split] = {"top1": knn(checkpoint, knn_root, run_dir / f"knn_{split}", per_slot=False)["top1"],
                             "statistics": slot_statistics(checkpoint, data_set.root / split),
                             "n": data_set.size(split)}
        record["val"]["linear"] = linear_probe(checkpoint, data_set.root / "knn_val", run_dir / "linear_val")
    checkpoint.unlink()
    write_json_atomic(record, result_path)
    return record


def parameters_and_step_times(data_set: DataSet, configs: Sequence[Config]) -> dict[str, dict[str, float]]:
    """Read-out and backbone parameters of each configuration, and its training-step time (best of
    :data:`TIMING_STEPS`, steps of all configurations interleaved so that other load hits them alike)."""
    torch.manual_seed(0)
    steps, facts = {}, {}
    for config in configs:
        args = main_dino.parse_args(training_argv(data_set, config, 0, Path("unused")))
        student, teacher = build_models(args, torch.device("cpu"))
        loss = DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp, 0,
                        args.epochs)
        optimizer = build_optimizer(args.optimizer, get_params_groups(student, args), torch.device("cpu"))
        step = TrainStep(args, student, student, teacher, loss, optimizer, None, "fp32", torch.device("cpu"))
        crops = [torch.randn(args.batch_size_per_gpu, 3, args.global_crop_size, args.global_crop_size)] * 2
        crops += [torch.randn(args.batch_size_per_gpu, 3, args.local_crop_size, args.local_crop_size)] * \
            args.local_crops_number
        steps[config.name] = (step, crops)
        backbone = student.backbone
        facts[config.name] = {"readout_parameters": sum(p.numel() for p in backbone.readout_module.parameters()),
                              "backbone_parameters": sum(p.numel() for p in backbone.parameters()),
                              "step_seconds": float("inf")}
    for _ in range(TIMING_STEPS + 1):  # the first round warms up
        for name, (step, crops) in steps.items():
            started = time.perf_counter()
            step(crops, epoch=1, momentum=0.99)
            facts[name]["step_seconds"] = min(facts[name]["step_seconds"], time.perf_counter() - started)
    return facts


# ------------------------------------------------------------------------------------------------------ table

def values(records: list[dict[str, Any]], split: str, metric: str) -> list[float]:
    if metric.startswith("k"):
        return [record[split]["top1"][metric[1:]] for record in records]
    if metric == "linear":
        return [record[split]["linear"] for record in records]
    return [record[split]["statistics"][metric] for record in records if record[split]["statistics"]]


def cell(numbers: list[float], digits: int = 1, reference: list[float] | None = None, n: int | None = None) -> str:
    """Mean (seed 0 / seed 1); ↑/↓ where the mean differs from ``reference``'s by more than the binomial noise
    (2 sigma at the reference's accuracy over ``n`` images) and the seeds of both agree on the side."""
    if not numbers:
        return "—"
    text = f"{np.mean(numbers):.{digits}f} ({' / '.join(f'{v:.{digits}f}' for v in numbers)})"
    if reference is not None and n:
        delta = float(np.mean(numbers) - np.mean(reference))
        beyond_seeds = min(numbers) > max(reference) or max(numbers) < min(reference)
        if abs(delta) > NOISE_SIGMAS * binomial_sigma(float(np.mean(reference)), n) and beyond_seeds:
            text += " ↑" if delta > 0 else " ↓"
    return text


COLUMNS = ("read-out", "read-out params", "model params", "step vs CLS", "k=10 hold", "k=20 hold",
           "k=10 val", "k=20 val", "linear val", "peak (val)", "sim (val)", "max att (val)", "artefact share (val)",
           "CLS artefact share (val)")


def table(data_set: DataSet, records: dict[str, list[dict[str, Any]]], facts: dict[str, dict[str, float]]) -> str:
    lines = [f"**{data_set.name}** ({data_set.description}; n = {data_set.size('holdout')} held out, "
             f"{data_set.size('val')} val; {data_set.epochs} epochs)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    reference = records["cls"]
    for config in CONFIGS:
        runs = records[config.name]
        fact = facts[config.name]
        row = [config.name, f"{fact['readout_parameters']:,}", f"{fact['backbone_parameters']:,}",
               f"{fact['step_seconds'] / facts['cls']['step_seconds']:.2f}x"]
        for split, metrics in (("holdout", ("k10", "k20")), ("val", ("k10", "k20", "linear"))):
            n = runs[0][split]["n"]
            row += [cell(values(runs, split, metric), reference=values(reference, split, metric), n=n)
                    for metric in metrics]
        row += [cell(values(runs, "val", key), 3) for key in ("slot_peakedness", "slot_pairwise_similarity",
                                                               "slot_max_attention", "slot_high_norm_share",
                                                               "cls_high_norm_share")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("experiments.readouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/results/readouts", help="results and runs folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--demo_epochs", type=int, default=6)
    parser.add_argument("--digits_epochs", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGS], choices=[c.name for c in CONFIGS])
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    data_sets = [prepare_demo(out / "data", args.demo_epochs), prepare_digits(out / "data", args.digits_epochs)]
    configs = [c for c in CONFIGS if c.name in args.configs]
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": summary_line(),
                               "seeds": args.seeds, "probe": list(PROBE_FLAGS), "knn_ks": list(KNN_KS), "sets": {}}
    sections = []
    for data_set in data_sets:
        runs = out / "runs" / data_set.name
        records = {config.name: [run(data_set, config, seed, runs / config.name / f"seed{seed}") for seed in args.seeds]
                   for config in configs}
        facts = parameters_and_step_times(data_set, configs)
        results["sets"][data_set.name] = {"records": records, "facts": facts}
        if len(configs) == len(CONFIGS):
            sections.append(table(data_set, records, facts))
            print(sections[-1], flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(results, out / "readouts.json")
    if sections:
        notes = ("Cells: mean over the seeds (seed 0 / seed 1). ↑/↓: differs from CLS by more than 2 binomial stds at "
                 "CLS's accuracy and both seeds lie on that side of both CLS seeds. Statistics: the read-out's "
                 "attention maps on up to 256 val images; 'artefact share' is the attention on tokens whose norm "
                 "exceeds 2x the median patch token's.")
        write_text_atomic("\n\n".join([*sections, notes]) + "\n", out / "readouts.md")
    return results


if __name__ == "__main__":
    main()
