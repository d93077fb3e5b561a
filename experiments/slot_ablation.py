"""Do SPARO's slots specialise? Read-out options that might make them, each trained at equal budget with two seeds,
on two data sets, against the paper's read-out (``default``) and DINO's CLS read-out.

    python -m experiments.slot_ablation --out experiments/results/slot_ablation

Data sets: the generated demo shapes and scikit-learn's digits (:mod:`experiments.base.data`, under ``OUT/data``).
Every run trains with the demo recipe on the training part only, every read-out flag the configurations vary stated
(:data:`~experiments.base.runs.PAPER_SPARO` with the configuration's changes). The k-NN of the held-out images
against the training part, and the slot statistics on them, choose the combination and the recommended defaults;
the val split is reported, never used to choose.

The options ``no_weight_decay`` (--sparo_weight_decay false) and ``logit_scale`` (--sparo_logit_scale true), and
the combination ``query_std_4 + no_weight_decay`` chosen with them, were measured at commit 9668c67; both changed
nothing beyond noise, and their flags were removed from the package as inert, so they are no longer run. Without
them the combination is chosen among the options left.

Per run: ``OUT/runs/<set>/<config>/seed<S>/`` holds the training ``log.txt``, ``train.log``, the k-NN outputs and
``result.json`` (a run that has one is not repeated). The table: the console, ``OUT/slot_ablation.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base.data import SPLITS, DataSet, prepare_demo, prepare_digits
from .base.evaluation import KNN_KS, STATISTICS_IMAGES, knn_run
from .base.report import NOISE_SIGMAS, binomial_sigma, cell, noise_mark, seed_values, study_command, write_report
from .base.runs import DINO_CLS, PAPER_SPARO, Configuration, flag_words

GOAL_PEAKEDNESS_RATIO = 3.0
GOAL_MAX_SIMILARITY = 0.7
COMBINED = "combined"
Records = dict[str, list[dict[str, Any]]]  # configuration name -> its runs (one per seed) on one set


@dataclass(frozen=True)
class Option(Configuration):
    """A read-out option; ``knob`` names the quantity it sets, so a combination never stacks two that set one."""
    knob: str = ""


def option(name: str, flag: str, value: float, description: str, knob: str) -> Option:
    return Option(name, {**PAPER_SPARO, flag: value}, description, knob)


DEFAULT = Option("default", PAPER_SPARO, "the paper's read-out and initialisation (key gain 1)")
CLS = Option("cls", DINO_CLS, "DINO's CLS read-out, for reference")
# Values chosen before training, from the causes: Adam moves a weight by about lr (here 5e-4 at the peak) per step,
# so x10 lets queries of scale 1 move; a key gain or query std of 4 raises the initial logit std about fourfold
# (on 48 demo training images at initialisation: peakedness 0.06 -> 0.36, slot-map similarity 0.78 -> 0.35).
# The scale-8 variants were added after a first pass, in which scale 4 reached only 2.4-2.6x the default's
# peakedness on the digits' held-out images (the val split played no part in adding them).
SINGLE_OPTIONS = (
    option("lr_mult_10", "sparo_lr_mult", 10, "(b) read-out learning rate x10", "lr"),
    option("query_std_4", "sparo_query_init_std", 4, "(d) queries initialised N(0, 4^2)", "initial_scale"),
    option("key_gain_4", "sparo_key_init_gain", 4, "(d) key projection xavier gain 4", "initial_scale"),
    option("query_std_8", "sparo_query_init_std", 8, "(d) queries initialised N(0, 8^2)", "initial_scale"),
    option("key_gain_8", "sparo_key_init_gain", 8, "(d) key projection xavier gain 8", "initial_scale"),
)


def is_sparo(config: Configuration) -> bool:
    return config.readout == "sparo"


def changes(config: Configuration) -> dict[str, Any]:
    """What a SPARO configuration changes in the paper's read-out (all its flags for any other)."""
    return {flag: value for flag, value in config.flags.items()
            if not is_sparo(config) or PAPER_SPARO.get(flag) != value}


def shown(flags: dict[str, Any]) -> str:
    return " ".join(flag_words(flags))


def folder(config: Configuration) -> str:
    """The runs' folder: for a combination, its options (a different combination never reuses runs)."""
    return config.name if config.name != COMBINED else f"{COMBINED}_{config.description.replace(' + ', '+')}"


@dataclass
class Comparison:
    """One configuration against the default on one split of one set (means over seeds)."""
    peakedness_ratio: float
    similarity: float
    default_similarity: float
    knn_delta: dict[str, float]
    knn_sigma: dict[str, float]

    @property
    def knn_not_lower(self) -> bool:
        return all(self.knn_delta[k] >= -NOISE_SIGMAS * self.knn_sigma[k] for k in KNN_KS)

    @property
    def slots_improved(self) -> bool:
        return self.peakedness_ratio > 1.0 and self.similarity < self.default_similarity

    @property
    def meets_goal(self) -> bool:
        return (self.peakedness_ratio >= GOAL_PEAKEDNESS_RATIO and self.similarity <= GOAL_MAX_SIMILARITY
                and self.knn_not_lower)


def mean(records: Records, name: str, split: str, metric: str) -> float:
    return float(np.mean(seed_values(records[name], split, metric)))


def compare(records: Records, config: Configuration, split: str) -> Comparison:
    """``config`` against the default on ``split``."""
    n, peak, similarity = records[DEFAULT.name][0][split]["n"], "slot_peakedness", "slot_pairwise_similarity"
    return Comparison(
        peakedness_ratio=mean(records, config.name, split, peak) / mean(records, DEFAULT.name, split, peak),
        similarity=mean(records, config.name, split, similarity),
        default_similarity=mean(records, DEFAULT.name, split, similarity),
        knn_delta={k: mean(records, config.name, split, f"k{k}") - mean(records, DEFAULT.name, split, f"k{k}")
                   for k in KNN_KS},
        knn_sigma={k: binomial_sigma(mean(records, DEFAULT.name, split, f"k{k}"), n) for k in KNN_KS})


def choose_combination(by_set: dict[str, Records]) -> Configuration:
    """The options that, on the held-out images of every set, raised peakedness, lowered slot-map similarity and
    did not lower k-NN beyond noise (at most one option per knob: the one with the larger smallest peakedness
    ratio); when fewer than two qualify, the two best-ranked options. Ranking: k-NN not lower everywhere, then
    slots improved everywhere, then the smallest peakedness ratio over the sets."""
    def standing(option: Option) -> tuple[bool, bool, float]:
        comparisons = [compare(records, option, "holdout") for records in by_set.values()]
        return (all(c.knn_not_lower for c in comparisons), all(c.slots_improved for c in comparisons),
                min(c.peakedness_ratio for c in comparisons))

    ranked = sorted(SINGLE_OPTIONS, key=standing, reverse=True)
    one_per_knob = [option for index, option in enumerate(ranked)
                    if option.knob not in {earlier.knob for earlier in ranked[:index]}]
    qualifying = [option for option in one_per_knob if all(standing(option)[:2])]
    chosen = qualifying if len(qualifying) >= 2 else one_per_knob[:2]
    merged = {flag: value for option in chosen for flag, value in changes(option).items()}
    return Configuration(COMBINED, {**PAPER_SPARO, **merged}, " + ".join(option.name for option in chosen))


def recommend(by_set: dict[str, Records], candidates: Sequence[Configuration]) -> Configuration | None:
    """Among ``candidates`` that meet the goal on the held-out images of every set, the one with the fewest flags
    whose held-out k-NN top-1 (mean over sets, seeds and k) is within noise of the best such; None when none does."""
    meeting = [config for config in candidates
               if all(compare(records, config, "holdout").meets_goal for records in by_set.values())]
    if not meeting:
        return None

    def holdout_knn(config: Configuration) -> float:
        return float(np.mean([mean(records, config.name, "holdout", f"k{k}") for records in by_set.values()
                              for k in KNN_KS]))

    best = max(holdout_knn(config) for config in meeting)
    noise = float(np.mean([compare(records, DEFAULT, "holdout").knn_sigma[k]
                           for records in by_set.values() for k in KNN_KS]))
    close = [config for config in meeting if holdout_knn(config) >= best - NOISE_SIGMAS * noise]
    return min(close, key=lambda config: (len(changes(config)), -holdout_knn(config)))


def goal_cell(comparison: Comparison) -> str:
    failures = []
    if comparison.peakedness_ratio < GOAL_PEAKEDNESS_RATIO:
        failures.append(f"peak x{comparison.peakedness_ratio:.1f}")
    if comparison.similarity > GOAL_MAX_SIMILARITY:
        failures.append(f"sim {comparison.similarity:.2f}")
    if not comparison.knn_not_lower:
        failures.append("k-NN lower")
    return "yes" if not failures else "no: " + ", ".join(failures)


def row(records: Records, config: Configuration, split: str) -> list[str]:
    """One split's cells of ``config``'s row: slot statistics (SPARO), k-NN (marked against the default), goal."""
    runs, sparo, option = records[config.name], is_sparo(config), config.name != DEFAULT.name
    if not sparo:
        cells = ["—"] * (4 if split == "holdout" else 2)
    else:
        peak = cell(seed_values(runs, split, "slot_peakedness"), 3)
        similarity = cell(seed_values(runs, split, "slot_pairwise_similarity"), 3)
        cells = [peak, similarity] if split == "val" else [
            cell([run["holdout_at_init"]["slot_peakedness"] for run in runs], 3), peak,
            f"x{compare(records, config, split).peakedness_ratio:.2f}", similarity]
    for k in KNN_KS:
        values, default = seed_values(runs, split, f"k{k}"), mean(records, DEFAULT.name, split, f"k{k}")
        mark = noise_mark(float(np.mean(values)) - default, binomial_sigma(default, runs[0][split]["n"]))
        cells.append(cell(values) + (mark if option else ""))
    return cells + [goal_cell(compare(records, config, split)) if sparo and option else "—"]


def table(data_sets: Sequence[DataSet], by_set: dict[str, Records], configs: Sequence[Configuration]) -> str:
    """The Markdown table: one row per set and configuration, means over seeds with each seed's value."""
    header = ["set", "config", "peak at init (hold)", "peak (hold)", "peak / default (hold)", "sim (hold)",
              "k=10 hold", "k=20 hold", "goal (hold)", "peak (val)", "sim (val)", "k=10 val", "k=20 val",
              "goal (val)", "train s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for data_set in data_sets:
        records = by_set[data_set.name]
        for config in configs:
            seconds = f"{np.mean([r['train_seconds'] for r in records[config.name]]):.0f}"
            cells = [data_set.name, config.name, *row(records, config, "holdout"), *row(records, config, "val"),
                     seconds]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_set_notes(data_sets: Sequence[DataSet], by_set: dict[str, Records], epochs: dict[str, int]) -> str:
    """Per set: the split sizes, the budget and the binomial noise of the default's k-NN."""
    lines = []
    for data_set in data_sets:
        sigmas = ", ".join(
            f"{split} (n = {data_set.size(split)}) k=20 σ = "
            f"{binomial_sigma(mean(by_set[data_set.name], DEFAULT.name, split, 'k20'), data_set.size(split)):.1f}"
            for split in ("holdout", "val"))
        lines.append(f"- **{data_set.name}**: {data_set.description}; {data_set.size('train')} training images, "
                     f"{epochs[data_set.name]} epochs per run; default's binomial std: {sigmas} points")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/slot_ablation"),
                        help="data sets, runs and the table (slot_ablation.md / .json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of every configuration")
    parser.add_argument("--demo_epochs", type=int, default=6, help="epochs per run on the demo set (1600 images)")
    parser.add_argument("--digits_epochs", type=int, default=10, help="epochs per run on the digits (1005 images)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: on cores shared with other work, one thread avoids the spin-waiting "
                        "that makes two threads several times slower")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep every run's checkpoint.pth")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = args.out.resolve()
    data_sets = [prepare_demo(out / "data"), prepare_digits(out / "data")]
    epochs = {"demo": args.demo_epochs, "digits": args.digits_epochs}
    by_set: dict[str, Records] = {data_set.name: {} for data_set in data_sets}

    def train_all(configs: Sequence[Configuration]) -> None:
        for data_set in data_sets:
            for config in configs:
                for seed in args.seeds:
                    record = knn_run(data_set, config, seed, epochs[data_set.name],
                                     out / "runs" / data_set.name / folder(config) / f"seed{seed}",
                                     per_slot=is_sparo(config), statistics_at_init=is_sparo(config),
                                     keep_checkpoint=args.keep_checkpoints)
                    by_set[data_set.name].setdefault(config.name, []).append(record)
                    print(f"{data_set.name:7s} {config.name:16s} seed {seed}: k-NN top-1 k=20 holdout "
                          f"{record['holdout']['top1']['20']:.1f} val {record['val']['top1']['20']:.1f} "
                          f"({record['seconds']:.0f} s)", flush=True)

    train_all((DEFAULT, *SINGLE_OPTIONS, CLS))
    combination = choose_combination(by_set)
    print(f"combination chosen on the held-out images: {combination.description} {shown(changes(combination))}",
          flush=True)
    train_all((combination,))

    configs = (DEFAULT, *SINGLE_OPTIONS, combination, CLS)
    recommended = recommend(by_set, (*SINGLE_OPTIONS, combination))
    verdict = {} if recommended is None else {
        name: {split: {"meets_goal": compare(records, recommended, split).meets_goal,
                       **asdict(compare(records, recommended, split))} for split in ("holdout", "val")}
        for name, records in by_set.items()}
    all_runs = [record for records in by_set.values() for runs in records.values() for record in runs]
    run_seconds = sum(record["seconds"] for record in all_runs)
    markdown = "\n".join([
        f"{len(all_runs)} runs, {run_seconds / 60:.1f} min of training and k-NN in all. Seeds "
        f"{', '.join(map(str, args.seeds))}; cells are the mean over seeds with each seed's value in brackets. "
        f"peak = mean slot peakedness, sim = mean pairwise slot-map similarity (eval_knn.py --per_slot statistics on "
        f"up to {STATISTICS_IMAGES} images of the split); k-NN top-1 (%) of the split against the training part. "
        f"↑/↓: the mean differs from the default's by more than {NOISE_SIGMAS:g} binomial stds sqrt(p(1-p)/n). Goal: "
        f"peak ≥ {GOAL_PEAKEDNESS_RATIO:g}x default, sim ≤ {GOAL_MAX_SIMILARITY}, k-NN (k=10 and 20) not lower.",
        "", data_set_notes(data_sets, by_set, epochs), "", table(data_sets, by_set, configs), "",
        "Configurations: " + "; ".join(f"`{c.name}` = {c.description}" + (f" (`{shown(changes(c))}`)" if changes(c)
                                                                          else "") for c in configs)
        + f"; every SPARO configuration states `{shown(DEFAULT.flags)}` before its changes.", "",
        ("Recommended (meets the goal on the held-out images of both sets, best held-out k-NN): "
         f"`{recommended.name}` (`{shown(changes(recommended))}`)" if recommended is not None else
         "No option meets the goal on the held-out images of both sets.")])
    return write_report(out, "slot_ablation", markdown, {
        "run_seconds": run_seconds, "seeds": args.seeds,
        "data_sets": [{"name": d.name, "root": str(d.root), "description": d.description,
                       "epochs": epochs[d.name], **{f"n_{s}": d.size(s) for s in SPLITS}} for d in data_sets],
        "configs": [asdict(c) for c in configs],
        "recommended": asdict(recommended) if recommended is not None else None,
        "recommended_verdict": verdict, "runs": by_set}, study_command("slot_ablation", argv),
        time.perf_counter() - started)


if __name__ == "__main__":
    main()
