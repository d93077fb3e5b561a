"""Do SPARO's slots specialise? Read-out options that might make them, each trained at equal budget with two seeds,
on two data sets, against the paper's read-out (``default``) and DINO's CLS read-out.

    python -m experiments.slot_ablation --out experiments/results/slot_ablation

Data sets (written once under ``OUT/data``):
- ``demo``: the built-in generated shapes (2000 train + 500 val, 64 px, colour classes), generated into
  ``OUT/data/demo_generated`` so the shared cache is never touched;
- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 grey scans, 10 classes), upscaled
  bicubically to 32 px RGB, split 70/30 (stratified, seed 0) into train and val.
Each set's train part is split once more (20 % of every class, seed 0) into the images training sees and a
held-out part. Every run trains with the demo recipe (``main_dino.DEMO_PRESET``, 32/16 px crops) on the training
part only, with every read-out flag the configurations vary stated (:data:`PAPER_READOUT` with the configuration's
changes), so that a later change of a default cannot change what a configuration measures. The k-NN of the held-out
images against the training part, and the slot statistics on the held-out images, choose the combination and the
recommended defaults; the val split is reported, never used to choose.

Per run: ``OUT/runs/<set>/<config>/seed<S>/`` holds the training ``log.txt`` (slot statistics per epoch on 16
training images), ``train.log``, the k-NN outputs and ``result.json``; a run whose ``result.json`` exists is not
repeated, so an interrupted ablation continues where it stopped. The table goes to the console and to
``OUT/slot_ablation.md`` and ``OUT/slot_ablation.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import eval_knn
import main_dino
from benchmarks.machine import summary_line
from dino_sparo.data.datasets import ImageDataset, evenly_spaced, ordered_loader
from dino_sparo.data.demo import ensure_demo_dataset
from dino_sparo.data.images import images_under
from dino_sparo.data.transforms import eval_transform
from dino_sparo.eval.slot_stats import measure_slots
from dino_sparo.models.config import build_backbone, resolve_model_config
from dino_sparo.utils.files import write_json_atomic, write_text_atomic

SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.3
DIGITS_IMAGE_SIZE = 32
# Photos bundled with scikit-image (no download), each at least 300 px on its shorter side; motorcycle is the left
# view of its stereo pair. Classes are the photos; images are random square crops of them.
PHOTO_NAMES = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
               "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket")
PHOTO_CROPS_PER_PHOTO = 120
PHOTO_CROP_SIDE = (0.15, 0.4)  # of the photo's shorter side, uniform
PHOTO_IMAGE_SIZE = 64
RESIZE_SIZE, CROP_SIZE = 36, 32  # the k-NN view for 32 px training crops
KNN_KS = ("10", "20")
KNN_METRICS = tuple(f"k{k}" for k in KNN_KS)
STATISTICS_IMAGES = 256  # as eval_knn.py --per_slot: up to 256 images, evenly spaced over the split
GOAL_PEAKEDNESS_RATIO = 3.0
GOAL_MAX_SIMILARITY = 0.7
NOISE_SIGMAS = 2.0  # a k-NN difference is called real beyond this many binomial stds of the default
SPLITS = ("train", "holdout", "val")
COMPLETE_MARKER = "complete.json"


# The read-out the options are measured against: the paper's, with its initialisation (key gain 1, query std 1;
# the results were measured when these were the defaults, and the key gain's default is 4 since). Every flag an
# option may change is here, and every SPARO configuration's command states all of them.
PAPER_READOUT = {"--readout": "sparo", "--readout_replace_blocks": "1", "--sparo_key_init_gain": "1",
                 "--sparo_query_init_std": "1", "--sparo_lr_mult": "1", "--sparo_weight_decay": "true",
                 "--sparo_logit_scale": "false"}


def paper_readout_with(*changes: str) -> tuple[str, ...]:
    """The flags of :data:`PAPER_READOUT` with ``changes`` (flag, value, flag, value, ...) applied."""
    unknown = sorted(set(changes[::2]) - set(PAPER_READOUT))
    if unknown or len(changes) % 2:
        raise ValueError(f"changes must be (flag, value) pairs of PAPER_READOUT's flags; not there: {unknown}")
    settings = {**PAPER_READOUT, **dict(zip(changes[::2], changes[1::2]))}
    return tuple(item for flag_and_value in settings.items() for item in flag_and_value)


@dataclass(frozen=True)
class Config:
    """A training configuration: ``flags`` on top of the demo recipe, every read-out flag it depends on stated.
    ``knob`` names the quantity an option sets, so a combination never stacks two options that set the same one."""
    name: str
    flags: tuple[str, ...]
    description: str
    knob: str = ""

    @property
    def is_sparo(self) -> bool:
        return dict(zip(self.flags[::2], self.flags[1::2])).get("--readout") == "sparo"

    @property
    def changes(self) -> tuple[str, ...]:
        """What a SPARO configuration changes in :data:`PAPER_READOUT` (all its flags for any other)."""
        if not self.is_sparo:
            return self.flags
        pairs = zip(self.flags[::2], self.flags[1::2])
        return tuple(item for flag, value in pairs if PAPER_READOUT.get(flag) != value for item in (flag, value))

    @property
    def folder(self) -> str:
        """The runs' folder name: for a combination, its options (a different combination never reuses runs)."""
        return self.name if self.name != COMBINED else f"{COMBINED}_{self.description.replace(' + ', '+')}"


COMBINED = "combined"
DEFAULT = Config("default", paper_readout_with(), "the paper's read-out and initialisation (key gain 1)")
CLS = Config("cls", ("--readout", "cls", "--readout_replace_blocks", "0"), "DINO's CLS read-out, for reference")
# Values chosen before training, from the causes: Adam moves a weight by about lr (here 5e-4 at the peak) per step,
# so x10 lets queries of scale 1 move; a key gain or query std of 4 raises the initial logit std about fourfold
# (on 48 demo training images at initialisation: peakedness 0.06 -> 0.36, slot-map similarity 0.78 -> 0.35).
# The scale-8 variants were added after a first pass, in which scale 4 reached only 2.4-2.6x the default's
# peakedness on the digits' held-out images (the val split played no part in adding them).
SINGLE_OPTIONS = tuple(Config(name, paper_readout_with(flag, value), description, knob)
                       for name, flag, value, description, knob in (
    ("no_weight_decay", "--sparo_weight_decay", "false", "(a) no weight decay on the queries and key/value projections",
     "weight_decay"),
    ("lr_mult_10", "--sparo_lr_mult", "10", "(b) read-out learning rate x10", "lr"),
    ("logit_scale", "--sparo_logit_scale", "true", "(c) learnable per-slot logit scale", "logit_scale"),
    ("query_std_4", "--sparo_query_init_std", "4", "(d) queries initialised N(0, 4^2)", "initial_scale"),
    ("key_gain_4", "--sparo_key_init_gain", "4", "(d) key projection xavier gain 4", "initial_scale"),
    ("query_std_8", "--sparo_query_init_std", "8", "(d) queries initialised N(0, 8^2)", "initial_scale"),
    ("key_gain_8", "--sparo_key_init_gain", "8", "(d) key projection xavier gain 8", "initial_scale"),
))


@dataclass(frozen=True)
class DataSet:
    """A prepared data set: ``root`` holds train/, holdout/, val/ (class folders) and the k-NN roots
    knn_holdout/ and knn_val/ (train/ = the training part, val/ = the evaluated split)."""
    name: str
    root: Path
    description: str
    epochs: int

    def size(self, split: str) -> int:
        return len(images_under(str(self.root / split)))


# ---------------------------------------------------------------------------------------------------- data sets

def stratified_holdout(items: Sequence[Any], labels: Sequence[str], fraction: float) -> tuple[list[Any], list[Any]]:
    """``(kept, held_out)``: ``fraction`` of every class held out, fixed by :data:`SPLIT_SEED`."""
    kept, held = train_test_split(list(items), test_size=fraction, stratify=list(labels), random_state=SPLIT_SEED)
    return kept, held


def write_data_set(root: Path, splits: dict[str, list[tuple[str, str, Callable[[Path], None]]]],
                   info: dict[str, Any]) -> None:
    """Writes ``splits`` (split -> ``(class, file name, write(path))``) as class folders under ``root``, plus the
    k-NN roots; built in a temporary folder and renamed, so an interrupted run leaves no half set."""
    temporary = root.with_name(root.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    for split, items in splits.items():
        for class_name, file_name, write in items:
            folder = temporary / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            write(folder / file_name)
    for evaluated in ("holdout", "val"):
        knn_root = temporary / f"knn_{evaluated}"
        knn_root.mkdir()
        (knn_root / "train").symlink_to(Path("..") / "train")
        (knn_root / "val").symlink_to(Path("..") / evaluated)
    (temporary / COMPLETE_MARKER).write_text(json.dumps(info, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    temporary.rename(root)


def prepare_demo(data_dir: Path, epochs: int) -> DataSet:
    """The demo set (generated here, as ``--demo`` would), its train/ split into training and held-out parts."""
    root = data_dir / "demo"
    description = "generated shapes, 64 px, 8 colour classes"
    if not (root / COMPLETE_MARKER).is_file():
        source = Path(ensure_demo_dataset(str(data_dir / "demo_generated")))

        def files(split: str) -> list[tuple[str, str]]:
            return [(path, Path(path).parent.name) for path in images_under(str(source / split))]

        train, holdout = stratified_holdout(files("train"), [label for _, label in files("train")], HOLDOUT_FRACTION)

        def copies(items: list[tuple[str, str]]) -> list[tuple[str, str, Callable[[Path], None]]]:
            return [(label, Path(path).name, lambda target, path=path: shutil.copyfile(path, target))
                    for path, label in items]

        write_data_set(root, {"train": copies(train), "holdout": copies(holdout), "val": copies(files("val"))},
                       {"source": str(source), "holdout_fraction": HOLDOUT_FRACTION, "seed": SPLIT_SEED})
    return DataSet("demo", root, description, epochs)


def prepare_digits(data_dir: Path, epochs: int) -> DataSet:
    """scikit-learn's digits (bundled with the package, no download) as PNG class folders."""
    root = data_dir / "digits"
    description = (f"scikit-learn handwritten digits, real 8x8 scans upscaled to {DIGITS_IMAGE_SIZE} px, "
                   f"10 classes")
    if not (root / COMPLETE_MARKER).is_file():
        digits = load_digits()
        labels = [str(label) for label in digits.target]
        indices = list(range(len(labels)))
        rest, val = stratified_holdout(indices, labels, DIGITS_VAL_FRACTION)
        train, holdout = stratified_holdout(rest, [labels[i] for i in rest], HOLDOUT_FRACTION)

        def image(index: int) -> Image.Image:
            grey = Image.fromarray(np.round(digits.images[index] * 255 / 16).astype(np.uint8), mode="L")
            return grey.resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.BICUBIC).convert("RGB")

        def pngs(chosen: list[int]) -> list[tuple[str, str, Callable[[Path], None]]]:
            return [(labels[i], f"{i:04d}.png", lambda target, i=i: image(i).save(target)) for i in chosen]

        write_data_set(root, {"train": pngs(train), "holdout": pngs(holdout), "val": pngs(val)},
                       {"source": "sklearn.datasets.load_digits", "val_fraction": DIGITS_VAL_FRACTION,
                        "holdout_fraction": HOLDOUT_FRACTION, "seed": SPLIT_SEED, "image_size": DIGITS_IMAGE_SIZE})
    return DataSet("digits", root, description, epochs)


def photo(name: str) -> Image.Image:
    """One of :data:`PHOTO_NAMES` as an RGB image."""
    from skimage import data  # only this set needs scikit-image

    pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return Image.fromarray(pixels).convert("RGB")


def prepare_photos(data_dir: Path, epochs: int) -> DataSet:
    """Random crops of the photos bundled with scikit-image, :data:`PHOTO_CROPS_PER_PHOTO` per photo, class =
    photo; split as the digits (30 % val, then 20 % of the rest held out). Crops of one photo may overlap across
    splits, as crops of one scene do."""
    root = data_dir / "photos"
    description = (f"random crops ({PHOTO_CROP_SIDE[0]:g}-{PHOTO_CROP_SIDE[1]:g} of the shorter side, resized to "
                   f"{PHOTO_IMAGE_SIZE} px) of {len(PHOTO_NAMES)} photos bundled with scikit-image, class = photo")
    if not (root / COMPLETE_MARKER).is_file():
        generator = np.random.default_rng(SPLIT_SEED)
        boxes = []  # (photo, left, top, side)
        for name in PHOTO_NAMES:
            width, height = photo(name).size
            for _ in range(PHOTO_CROPS_PER_PHOTO):
                side = int(generator.uniform(*PHOTO_CROP_SIDE) * min(width, height))
                boxes.append((name, int(generator.integers(0, width - side + 1)),
                              int(generator.integers(0, height - side + 1)), side))
        labels = [box[0] for box in boxes]
        indices = list(range(len(boxes)))
        rest, val = stratified_holdout(indices, labels, DIGITS_VAL_FRACTION)
        train, holdout = stratified_holdout(rest, [labels[i] for i in rest], HOLDOUT_FRACTION)
        photos = {name: photo(name) for name in PHOTO_NAMES}

        def crop(index: int) -> Image.Image:
            name, left, top, side = boxes[index]
            return photos[name].crop((left, top, left + side, top + side)).resize(
                (PHOTO_IMAGE_SIZE, PHOTO_IMAGE_SIZE), Image.BICUBIC)

        def pngs(chosen: list[int]) -> list[tuple[str, str, Callable[[Path], None]]]:
            return [(labels[i], f"{i:04d}.png", lambda target, i=i: crop(i).save(target)) for i in chosen]

        write_data_set(root, {"train": pngs(train), "holdout": pngs(holdout), "val": pngs(val)},
                       {"source": "skimage.data", "photos": list(PHOTO_NAMES), "crops_per_photo":
                        PHOTO_CROPS_PER_PHOTO, "crop_side": list(PHOTO_CROP_SIDE), "val_fraction": DIGITS_VAL_FRACTION,
                        "holdout_fraction": HOLDOUT_FRACTION, "seed": SPLIT_SEED, "image_size": PHOTO_IMAGE_SIZE})
    return DataSet("photos", root, description, epochs)


# --------------------------------------------------------------------------------------------------------- runs

def training_argv(data_set: DataSet, config: Config, seed: int, run_dir: Path) -> list[str]:
    """main_dino.py's command line for one run: the demo recipe on the set's training part."""
    return ["--demo", "--data_path", str(data_set.root / "train"), "--output_dir", str(run_dir),
            "--epochs", str(data_set.epochs), "--seed", str(seed), "--num_workers", "2", "--device", "cpu",
            "--precision", "fp32", "--saveckp_freq", "0", "--viz_freq", "0", "--log_freq", "1000",
            *config.flags]


def statistics_at_init(argv: list[str], images_dir: Path) -> dict[str, float]:
    """Slot statistics of a backbone built from the same flags and seed, untrained, on the images eval_knn.py
    --per_slot measures (up to 256, evenly spaced): what training starts from."""
    args = main_dino.parse_args(argv)
    torch.manual_seed(args.seed)
    backbone = build_backbone(resolve_model_config(args))
    images = ImageDataset(str(images_dir), eval_transform(RESIZE_SIZE, CROP_SIZE))
    loader = ordered_loader(evenly_spaced(images, STATISTICS_IMAGES), batch_size=128, num_workers=0)
    return measure_slots(backbone, (batch for batch, _ in loader), "cpu").summary()


def knn(checkpoint: Path, knn_root: Path, output_dir: Path, per_slot: bool, flags: Sequence[str] = ()
        ) -> dict[str, Any]:
    """eval_knn.py on the teacher of ``checkpoint``: top-1 at k = 10 and 20 and, for SPARO, the slot statistics
    on the evaluated images (``flags``: eval_knn.py's model flags, to read the checkpoint otherwise)."""
    argv = ["--pretrained_weights", str(checkpoint), "--data_path", str(knn_root), "--resize_size",
            str(RESIZE_SIZE), "--crop_size", str(CROP_SIZE), "--nb_knn", *KNN_KS, "--num_workers", "0",
            "--use_cuda", "false", "--output_dir", str(output_dir), *flags] + (["--per_slot"] if per_slot else [])
    output_dir.mkdir(parents=True, exist_ok=True)
    results = eval_knn.main(argv)
    return {"top1": {k: results["knn"][k]["top1"] for k in KNN_KS},
            "statistics": results["per_slot"]["statistics"] if per_slot else None}


def run(data_set: DataSet, config: Config, seed: int, run_dir: Path, keep_checkpoint: bool) -> dict[str, Any]:
    """Trains one configuration (output in ``run_dir/train.log``) and evaluates it; ``run_dir/result.json``."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = training_argv(data_set, config, seed, run_dir)
    record: dict[str, Any] = {"data_set": data_set.name, "config": config.name, "seed": seed,
                              "command": "python main_dino.py " + " ".join(argv)}
    if config.is_sparo:
        record["holdout_at_init"] = statistics_at_init(argv, data_set.root / "holdout")
    started = time.perf_counter()
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        main_dino.main(argv)
        record["train_seconds"] = time.perf_counter() - started
        epochs = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
        record["last_epoch"] = epochs[-1]
        checkpoint = run_dir / "checkpoint.pth"
        for split in ("holdout", "val"):
            record[split] = knn(checkpoint, data_set.root / f"knn_{split}", run_dir / f"knn_{split}",
                                config.is_sparo)
            record[split]["n"] = data_set.size(split)
    record["seconds"] = time.perf_counter() - started
    if not keep_checkpoint:
        checkpoint.unlink()
    write_json_atomic(record, result_path)
    return record


# -------------------------------------------------------------------------------------------------- comparison

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


STATISTIC_KEYS = {"peakedness": "slot_peakedness", "similarity": "slot_pairwise_similarity"}


def seed_values(records: Iterable[dict[str, Any]], split: str, metric: str) -> list[float]:
    """``metric`` (``peakedness``, ``similarity``, ``init_peakedness``, ``k10``, ``k20``) of every seed's run."""
    if metric in KNN_METRICS:
        return [record[split]["top1"][metric[1:]] for record in records]
    if metric == "init_peakedness":
        return [record[f"{split}_at_init"]["slot_peakedness"] for record in records]
    return [record[split]["statistics"][STATISTIC_KEYS[metric]] for record in records]


def binomial_sigma(top1_percent: float, n: int) -> float:
    """Standard deviation, in percentage points, of an accuracy ``top1_percent`` measured on ``n`` images."""
    p = top1_percent / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / n)


def compare(records: dict[str, list[dict[str, Any]]], config: Config, split: str) -> Comparison:
    """``config`` against the default on ``split`` (records: config name -> the runs of one set)."""
    mean = lambda name, metric: float(np.mean(seed_values(records[name], split, metric)))
    n = records[DEFAULT.name][0][split]["n"]
    return Comparison(
        peakedness_ratio=mean(config.name, "peakedness") / mean(DEFAULT.name, "peakedness"),
        similarity=mean(config.name, "similarity"),
        default_similarity=mean(DEFAULT.name, "similarity"),
        knn_delta={k: mean(config.name, f"k{k}") - mean(DEFAULT.name, f"k{k}") for k in KNN_KS},
        knn_sigma={k: binomial_sigma(mean(DEFAULT.name, f"k{k}"), n) for k in KNN_KS},
    )


def choose_combination(by_set: dict[str, dict[str, list[dict[str, Any]]]]) -> Config:
    """The options that, on the held-out images of every set, raised peakedness, lowered slot-map similarity and
    did not lower k-NN beyond noise (at most one option per knob: the one with the larger smallest peakedness
    ratio); when fewer than two qualify, the two best-ranked options. Ranking: k-NN not lower everywhere, then
    slots improved everywhere, then the smallest peakedness ratio over the sets."""
    def standing(option: Config) -> tuple[bool, bool, float]:
        comparisons = [compare(records, option, "holdout") for records in by_set.values()]
        return (all(c.knn_not_lower for c in comparisons), all(c.slots_improved for c in comparisons),
                min(c.peakedness_ratio for c in comparisons))

    ranked = sorted(SINGLE_OPTIONS, key=standing, reverse=True)
    one_per_knob = [option for index, option in enumerate(ranked)
                    if option.knob not in {earlier.knob for earlier in ranked[:index]}]
    qualifying = [option for option in one_per_knob if all(standing(option)[:2])]
    chosen = qualifying if len(qualifying) >= 2 else one_per_knob[:2]
    return Config(COMBINED, paper_readout_with(*(item for option in chosen for item in option.changes)),
                  " + ".join(option.name for option in chosen))


def recommend(by_set: dict[str, dict[str, list[dict[str, Any]]]], candidates: Sequence[Config]) -> Config | None:
    """Among ``candidates`` that meet the goal on the held-out images of every set, the one with the fewest flags
    whose held-out k-NN top-1 (mean over sets, seeds and k) is within noise of the best such; None when none
    meets it."""
    meeting = [config for config in candidates
               if all(compare(records, config, "holdout").meets_goal for records in by_set.values())]

    def holdout_knn(config: Config) -> float:
        return float(np.mean([seed_values(records[config.name], "holdout", f"k{k}")
                              for records in by_set.values() for k in KNN_KS]))

    if not meeting:
        return None
    best = max(holdout_knn(config) for config in meeting)
    noise = float(np.mean([compare(records, DEFAULT, "holdout").knn_sigma[k]
                           for records in by_set.values() for k in KNN_KS]))
    close = [config for config in meeting if holdout_knn(config) >= best - NOISE_SIGMAS * noise]
    return min(close, key=lambda config: (len(config.changes), -holdout_knn(config)))


# ------------------------------------------------------------------------------------------------------- table

def cell(values: list[float], digits: int) -> str:
    """``mean (seed0/seed1/...)``."""
    return f"{np.mean(values):.{digits}f} ({'/'.join(f'{v:.{digits}f}' for v in values)})"


def knn_cell(values: list[float], delta: float | None, sigma: float) -> str:
    """A k-NN cell; the mean is marked up or down when it differs from the default's beyond noise."""
    mark = ""
    if delta is not None and abs(delta) > NOISE_SIGMAS * sigma:
        mark = " ↑" if delta > 0 else " ↓"
    return cell(values, 1) + mark


def goal_cell(comparison: Comparison) -> str:
    failures = []
    if comparison.peakedness_ratio < GOAL_PEAKEDNESS_RATIO:
        failures.append(f"peak x{comparison.peakedness_ratio:.1f}")
    if comparison.similarity > GOAL_MAX_SIMILARITY:
        failures.append(f"sim {comparison.similarity:.2f}")
    if not comparison.knn_not_lower:
        failures.append("k-NN lower")
    return "yes" if not failures else "no: " + ", ".join(failures)


def table(data_sets: Sequence[DataSet], by_set: dict[str, dict[str, list[dict[str, Any]]]],
          configs: Sequence[Config]) -> str:
    """The Markdown table: one row per set and configuration, means over seeds with each seed's value."""
    header = ["set", "config", "peak at init (hold)", "peak (hold)", "peak / default (hold)", "sim (hold)",
              "k=10 hold", "k=20 hold", "goal (hold)", "peak (val)", "sim (val)", "k=10 val", "k=20 val",
              "goal (val)", "train s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for data_set in data_sets:
        records = by_set[data_set.name]
        for config in configs:
            runs = records[config.name]
            row = [data_set.name, config.name]
            for split in ("holdout", "val"):
                comparison = compare(records, config, split) if config.is_sparo else None
                is_option = config.name != DEFAULT.name
                if config.is_sparo:
                    if split == "holdout":
                        row.append(cell(seed_values(runs, split, "init_peakedness"), 3))
                    row.append(cell(seed_values(runs, split, "peakedness"), 3))
                    if split == "holdout":
                        row.append(f"x{comparison.peakedness_ratio:.2f}")
                    row.append(cell(seed_values(runs, split, "similarity"), 3))
                else:
                    row += ["—", "—", "—", "—"] if split == "holdout" else ["—", "—"]
                default_knn = {k: float(np.mean(seed_values(records[DEFAULT.name], split, f"k{k}"))) for k in KNN_KS}
                n = runs[0][split]["n"]
                for k in KNN_KS:
                    values = seed_values(runs, split, f"k{k}")
                    delta = float(np.mean(values)) - default_knn[k] if is_option else None
                    row.append(knn_cell(values, delta, binomial_sigma(default_knn[k], n)))
                row.append(goal_cell(comparison) if config.is_sparo and is_option else "—")
            row.append(f"{np.mean([r['train_seconds'] for r in runs]):.0f}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def data_set_notes(data_sets: Sequence[DataSet], by_set: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Per set: the split sizes, the budget and the binomial noise of the default's k-NN."""
    lines = []
    for data_set in data_sets:
        default_runs = by_set[data_set.name][DEFAULT.name]
        sigmas = ", ".join(
            f"{split} (n = {data_set.size(split)}) k=20 σ = "
            f"{binomial_sigma(float(np.mean(seed_values(default_runs, split, 'k20'))), data_set.size(split)):.1f}"
            for split in ("holdout", "val"))
        lines.append(f"- **{data_set.name}**: {data_set.description}; {data_set.size('train')} training images, "
                     f"{data_set.epochs} epochs per run; default's binomial std: {sigmas} points")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- main

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/slot_ablation"),
                        help="data sets, runs and the table (slot_ablation.md / .json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of every configuration")
    parser.add_argument("--demo_epochs", type=int, default=6,
                        help="epochs per run on the demo set (1600 training images each)")
    parser.add_argument("--digits_epochs", type=int, default=10,
                        help="epochs per run on the digits (1005 training images each)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: on cores shared with other work, one thread avoids the spin-waiting "
                        "that makes two threads several times slower")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep every run's checkpoint.pth")
    return parser


def train_all(data_sets: Sequence[DataSet], configs: Sequence[Config], seeds: Sequence[int], out: Path,
              keep_checkpoints: bool, by_set: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Runs every configuration on every set with every seed, one after the other, into ``by_set``."""
    for data_set in data_sets:
        for config in configs:
            for seed in seeds:
                record = run(data_set, config, seed, out / "runs" / data_set.name / config.folder / f"seed{seed}",
                             keep_checkpoints)
                by_set[data_set.name].setdefault(config.name, []).append(record)
                summary = f"{data_set.name:7s} {config.name:16s} seed {seed}: "
                summary += f"k-NN top-1 k=20 holdout {record['holdout']['top1']['20']:.1f} val " \
                           f"{record['val']['top1']['20']:.1f}"
                if config.is_sparo:
                    stats = record["holdout"]["statistics"]
                    summary += (f", holdout peakedness {stats['slot_peakedness']:.3f} similarity "
                                f"{stats['slot_pairwise_similarity']:.3f}")
                print(summary + f" ({record['seconds']:.0f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = args.out.resolve()
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    data_sets = [prepare_demo(data_dir, args.demo_epochs), prepare_digits(data_dir, args.digits_epochs)]
    by_set: dict[str, dict[str, list[dict[str, Any]]]] = {data_set.name: {} for data_set in data_sets}

    train_all(data_sets, (DEFAULT, *SINGLE_OPTIONS, CLS), args.seeds, out, args.keep_checkpoints, by_set)
    combination = choose_combination(by_set)
    print(f"combination chosen on the held-out images: {combination.description} {' '.join(combination.changes)}",
          flush=True)
    train_all(data_sets, (combination,), args.seeds, out, args.keep_checkpoints, by_set)

    configs = (DEFAULT, *SINGLE_OPTIONS, combination, CLS)
    recommended = recommend(by_set, (*SINGLE_OPTIONS, combination))
    wall_seconds = time.perf_counter() - started
    verdict = {} if recommended is None else {
        name: {split: {"meets_goal": compare(records, recommended, split).meets_goal,
                       **asdict(compare(records, recommended, split))} for split in ("holdout", "val")}
        for name, records in by_set.items()}
    command = ("python -m experiments.slot_ablation " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    all_runs = [record for records in by_set.values() for runs in records.values() for record in runs]
    run_seconds = sum(record["seconds"] for record in all_runs)
    markdown = "\n".join([
        f"Command: `{command}`; machine: {summary_line()}; {len(all_runs)} runs, "
        f"{run_seconds / 60:.1f} min of training and k-NN in all (wall time of this invocation, which reuses "
        f"finished runs: {wall_seconds / 60:.1f} min).",
        f"Seeds {', '.join(map(str, args.seeds))}; cells are the mean over seeds with each seed's value in brackets. "
        f"peak = mean slot peakedness, sim = mean pairwise slot-map similarity (eval_knn.py --per_slot statistics on "
        f"up to {STATISTICS_IMAGES} images of the split); k-NN top-1 (%) of the split against the training part. "
        f"↑/↓: the mean differs from the default's by more than {NOISE_SIGMAS:g} binomial stds sqrt(p(1-p)/n). Goal: "
        f"peak ≥ {GOAL_PEAKEDNESS_RATIO:g}x default, sim ≤ {GOAL_MAX_SIMILARITY}, k-NN (k=10 and 20) not lower.",
        "",
        data_set_notes(data_sets, by_set),
        "",
        table(data_sets, by_set, configs),
        "",
        "Configurations: " + "; ".join(f"`{c.name}` = {c.description}" + (f" (`{' '.join(c.changes)}`)" if c.changes
                                                                          else "") for c in configs)
        + f"; every SPARO configuration states `{' '.join(DEFAULT.flags)}` before its changes.",
        "",
        ("Recommended (meets the goal on the held-out images of both sets, best held-out k-NN): "
         f"`{recommended.name}` (`{' '.join(recommended.changes)}`)" if recommended is not None else
         "No option meets the goal on the held-out images of both sets."),
    ])
    print(markdown, flush=True)
    write_text_atomic(markdown + "\n", out / "slot_ablation.md")
    summary = {"command": command, "machine": summary_line(), "wall_seconds": wall_seconds, "run_seconds": run_seconds,
               "seeds": args.seeds,
               "data_sets": [{**asdict(d), "root": str(d.root), **{f"n_{s}": d.size(s) for s in SPLITS}}
                             for d in data_sets],
               "configs": [asdict(c) for c in configs],
               "recommended": asdict(recommended) if recommended is not None else None,
               "recommended_verdict": verdict, "runs": by_set}
    write_json_atomic(summary, out / "slot_ablation.json")
    return summary


if __name__ == "__main__":
    main()
