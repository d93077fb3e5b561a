"""Which read-out? Every registered read-out (and SPARO with 4 registers) trained with one DINO recipe at equal
budget, two seeds, on the generated demo set and on real scans (scikit-learn's digits).

    python -m experiments.readouts --out experiments/results/readouts

The data sets, their held-out part of the training images and the k-NN view are the common ones
(:mod:`experiments.base`, written under ``OUT/data``). Every run trains with the demo recipe (configs/demo.yaml:
ViT-Tiny/8, depth 3, 32/16 px crops) on the training part only, with each read-out's flags written out in full
(:data:`CONFIGS`), so a later change of a default cannot change what is measured. Per run: k-NN top-1 (k = 10, 20) of
the teacher on the held-out images and on val; a linear probe on val (:data:`PROBE_LR`, :data:`PROBE_EPOCHS`: the
learning rate that did best of 0.1, 1 and 10 on the digits' held-out images, for a CLS and a SPARO model trained 3
epochs); for read-outs with attention maps, the slot statistics and the artefact share on those images. The step
time of every read-out is measured apart, in one process, interleaved, relative to CLS. Runs whose ``result.json``
exists are not repeated.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino_sparo.train.build import build_training
from dino_sparo.utils.files import write_json_atomic

from .base.data import DataSet, prepare_demo, prepare_digits
from .base.evaluation import EVALUATED_SPLITS, KNN_KS, knn_on_splits, linear_probe, slot_statistics, teacher_backbone
from .base.report import binomial_sigma, cell, noise_mark, seed_values, study_command, write_report
from .base.runs import DINO_CLS, Configuration, cached_run, training_run

# A linear probe that fits these small sets in a few epochs: SGD as eval_linear.py, lr 0.1 x batch / 256.
PROBE_LR, PROBE_EPOCHS = 0.1, 10
TIMING_STEPS = 6
SPARO = {"readout": "sparo", "readout_replace_blocks": 1, "sparo_slots": 16, "sparo_slot_dim": 16, "sparo_attn_dim": 16,
         "sparo_key_init_gain": 4, "sparo_query_init_std": 1, "sparo_share_kv": True, "sparo_slot_norm": True,
         "sparo_lr_mult": 1}
CONFIGS = (
    Configuration("cls", DINO_CLS, "DINO's CLS token of the last block"),
    Configuration("gap", {"readout": "gap", "readout_replace_blocks": 0}, "mean of the final patch tokens"),
    Configuration("sparo", {**SPARO, "num_registers": 0}, "16 SPARO slots of 16 dims replacing the last block"),
    Configuration("sparo_reg4", {**SPARO, "num_registers": 4}, "SPARO as above, the backbone with 4 registers"),
    Configuration("map", {"readout": "map", "readout_replace_blocks": 0, "map_heads": 3, "map_mlp_ratio": 4},
                  "MAP: one latent query, 3 heads, MLP x4, on top of every block"),
    Configuration("simpool", {"readout": "simpool", "readout_replace_blocks": 0, "simpool_heads": 1,
                              "simpool_gamma": 1.25}, "SimPool, gamma 1.25, one head, on top of every block"),
)


def run(data_set: DataSet, config: Configuration, seed: int, epochs: int, run_dir: Path) -> dict[str, Any]:
    """Trains one read-out and evaluates it: k-NN and the read-out's map statistics on both evaluated splits, the
    linear probe on val."""
    def work() -> dict[str, Any]:
        training = training_run(data_set, run_dir, seed, epochs, config.flags)
        record: dict[str, Any] = {"data_set": data_set.name, "config": config.name, "seed": seed,
                                  **training.train(), **knn_on_splits(training.checkpoint, data_set, run_dir)}
        teacher = teacher_backbone(training.checkpoint)
        for split in EVALUATED_SPLITS:
            record[split]["statistics"] = slot_statistics(teacher, data_set.root / split)
        record["val"]["linear"] = linear_probe(training.checkpoint, data_set.root / "knn_val", run_dir / "linear_val",
                                               PROBE_LR, PROBE_EPOCHS)
        training.checkpoint.unlink()
        return record

    return cached_run(run_dir, work)


def parameters_and_step_times(data_set: DataSet, configs: Sequence[Configuration], epochs: int
                              ) -> dict[str, dict[str, float]]:
    """Read-out and backbone parameters of each configuration, and its training-step time (best of
    :data:`TIMING_STEPS`, steps of all configurations interleaved so that other load hits them alike)."""
    torch.manual_seed(0)
    steps, facts = {}, {}
    for config in configs:
        run_config = training_run(data_set, Path("unused"), 0, epochs, config.flags).config
        step = build_training(run_config)
        batch = run_config.batch_size_per_gpu
        crops = [torch.randn(batch, 3, run_config.global_crop_size, run_config.global_crop_size)] * 2
        crops += [torch.randn(batch, 3, run_config.local_crop_size, run_config.local_crop_size)] * \
            run_config.local_crops_number
        steps[config.name] = (step, crops)
        backbone = step.student_module.backbone
        facts[config.name] = {"readout_parameters": sum(p.numel() for p in backbone.readout_module.parameters()),
                              "backbone_parameters": sum(p.numel() for p in backbone.parameters()),
                              "step_seconds": float("inf")}
    for _ in range(TIMING_STEPS + 1):  # the first round warms up
        for name, (step, crops) in steps.items():
            started = time.perf_counter()
            step(crops, epoch=1, momentum=0.99)
            facts[name]["step_seconds"] = min(facts[name]["step_seconds"], time.perf_counter() - started)
    return facts


def marked(numbers: list[float], reference: list[float], n: int) -> str:
    """A cell, marked ↑/↓ where the mean differs from ``reference``'s beyond the binomial noise at the reference's
    accuracy over ``n`` images and the seeds of both agree on the side."""
    if not numbers:
        return cell(numbers)
    beyond_seeds = min(numbers) > max(reference) or max(numbers) < min(reference)
    mark = noise_mark(float(np.mean(numbers) - np.mean(reference)), binomial_sigma(float(np.mean(reference)), n))
    return cell(numbers) + (mark if beyond_seeds else "")


COLUMNS = ("read-out", "read-out params", "model params", "step vs CLS", "k=10 hold", "k=20 hold",
           "k=10 val", "k=20 val", "linear val", "peak (val)", "sim (val)", "max att (val)", "artefact share (val)",
           "CLS artefact share (val)")


def table(data_set: DataSet, epochs: int, records: dict[str, list[dict[str, Any]]],
          facts: dict[str, dict[str, float]]) -> str:
    lines = [f"**{data_set.name}** ({data_set.description}; n = {data_set.size('holdout')} held out, "
             f"{data_set.size('val')} val; {epochs} epochs)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    reference = records["cls"]
    for config in CONFIGS:
        runs = records[config.name]
        fact = facts[config.name]
        row = [config.name, f"{fact['readout_parameters']:,}", f"{fact['backbone_parameters']:,}",
               f"{fact['step_seconds'] / facts['cls']['step_seconds']:.2f}x"]
        for split, metrics in (("holdout", ("k10", "k20")), ("val", ("k10", "k20", "linear"))):
            row += [marked(seed_values(runs, split, metric), seed_values(reference, split, metric), runs[0][split]["n"])
                    for metric in metrics]
        row += [cell(seed_values(runs, "val", key), 3) for key in ("slot_peakedness", "slot_pairwise_similarity",
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
    data_sets = [prepare_demo(out / "data"), prepare_digits(out / "data")]
    epochs = {"demo": args.demo_epochs, "digits": args.digits_epochs}
    configs = [c for c in CONFIGS if c.name in args.configs]
    started = time.perf_counter()
    results: dict[str, Any] = {"seeds": args.seeds, "probe": {"lr": PROBE_LR, "epochs": PROBE_EPOCHS},
                               "knn_ks": list(KNN_KS), "sets": {}}
    sections = []
    for data_set in data_sets:
        runs = out / "runs" / data_set.name
        records = {config.name: [run(data_set, config, seed, epochs[data_set.name], runs / config.name / f"seed{seed}")
                                 for seed in args.seeds] for config in configs}
        facts = parameters_and_step_times(data_set, configs, epochs[data_set.name])
        results["sets"][data_set.name] = {"records": records, "facts": facts}
        if len(configs) == len(CONFIGS):
            sections.append(table(data_set, epochs[data_set.name], records, facts))
    command, seconds = study_command("readouts", argv), time.perf_counter() - started
    if not sections:  # the tables compare with CLS and every read-out: a partial run writes its numbers only
        write_json_atomic({"command": command, "wall_seconds": seconds, **results}, out / "readouts.json")
        return results
    notes = ("Cells: mean over the seeds (seed 0 / seed 1). ↑/↓: differs from CLS by more than 2 binomial stds at "
             "CLS's accuracy and both seeds lie on that side of both CLS seeds. Statistics: the read-out's attention "
             "maps on up to 256 val images; 'artefact share' is the attention on tokens whose norm exceeds 2x the "
             "median patch token's.")
    return write_report(out, "readouts", "\n\n".join([*sections, notes]), results, command, seconds)


if __name__ == "__main__":
    main()
