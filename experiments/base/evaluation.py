"""Evaluations of a trained checkpoint's teacher, as the studies read them: k-NN through eval_knn.py's entry point
(k = 10 and 20, optionally with the per-slot statistics), the read-out's map statistics on a split, and a linear
probe through eval_linear.py's entry point; and the run most studies make, trained and k-NN-evaluated
(:func:`knn_run`). Images are seen as for 32 px training crops (resized to 36, centre crop 32)."""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

import eval_knn
import eval_linear
from dino_sparo.data.datasets import ImageDataset, evenly_spaced, ordered_loader
from dino_sparo.data.transforms import eval_transform
from dino_sparo.eval.slot_stats import measure_slots
from dino_sparo.models import build_pretrained_backbone

from .data import DataSet
from .runs import Configuration, cached_run, flag_words, training_run

RESIZE_SIZE, CROP_SIZE = 36, 32  # the evaluation view of 32 px training crops
KNN_KS = ("10", "20")
STATISTICS_IMAGES = 256  # as eval_knn.py --per_slot: up to 256 images, evenly spaced over the split
EVALUATED_SPLITS = ("holdout", "val")


def run_eval_knn(checkpoint: Path, knn_root: Path, output_dir: Path, per_slot: bool = False,
                 flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """eval_knn.py's results for the teacher of ``checkpoint`` on ``knn_root`` (train/ against val/), k = 10 and 20,
    on the CPU; ``flags``: more of eval_knn.py's flags (names without the dashes), e.g. model flags that read the
    checkpoint otherwise or the attribute tables."""
    argv = ["--pretrained_weights", str(checkpoint), "--data_path", str(knn_root), "--resize_size", str(RESIZE_SIZE),
            "--crop_size", str(CROP_SIZE), "--nb_knn", *KNN_KS, "--num_workers", "0", "--use_cuda", "false",
            "--output_dir", str(output_dir), *flag_words(flags or {})] + (["--per_slot"] if per_slot else [])
    output_dir.mkdir(parents=True, exist_ok=True)
    return eval_knn.main(argv)


def knn(checkpoint: Path, knn_root: Path, output_dir: Path, per_slot: bool = False,
        flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Top-1 (%) at k = 10 and 20 and, with ``per_slot``, the slot statistics on the evaluated images."""
    results = run_eval_knn(checkpoint, knn_root, output_dir, per_slot, flags)
    return {"top1": {k: results["knn"][k]["top1"] for k in KNN_KS},
            "statistics": results["per_slot"]["statistics"] if per_slot else None}


def knn_on_splits(checkpoint: Path, data_set: DataSet, run_dir: Path, per_slot: bool = False,
                  flags: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`knn` of the held-out images and of val against the training part, each with its ``n``
    (outputs in ``run_dir/knn_<split>``)."""
    return {split: {**knn(checkpoint, data_set.root / f"knn_{split}", run_dir / f"knn_{split}", per_slot, flags),
                    "n": data_set.size(split)} for split in EVALUATED_SPLITS}


def teacher_backbone(checkpoint: Path, flags: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The frozen teacher backbone of ``checkpoint`` (``flags``: model flags that read it otherwise)."""
    return build_pretrained_backbone(str(checkpoint), "teacher", flags or {}, verbose=False)[0]


def image_batches(folder: Path, count: int = STATISTICS_IMAGES, resize_size: int = RESIZE_SIZE,
                  crop_size: int = CROP_SIZE, batch_size: int = 128) -> Iterator[torch.Tensor]:
    """Up to ``count`` images of ``folder``, evenly spaced over it, in the evaluation view."""
    images = ImageDataset(str(folder), eval_transform(resize_size, crop_size))
    return (batch for batch, _ in ordered_loader(evenly_spaced(images, count), batch_size, num_workers=0))


def slot_statistics(model: torch.nn.Module, folder: Path) -> dict[str, float] | None:
    """The read-out's map statistics (peakedness, similarity, artefact shares, ...) on up to 256 images of
    ``folder``, as eval_knn.py --per_slot measures them; None for a read-out without maps."""
    if not model.readout_module.has_attention_maps:
        return None
    return measure_slots(model, image_batches(folder), "cpu").summary()


def linear_probe(checkpoint: Path, knn_root: Path, output_dir: Path, lr: float, epochs: int,
                 batch_size: int = 128) -> float:
    """eval_linear.py's val top-1 (%) after ``epochs`` of SGD at ``lr`` (for a batch of 256, scaled with the batch
    size as DINO's); ``output_dir`` keeps the probe's checkpoint, so give every learning rate its own."""
    results = eval_linear.main(["--pretrained_weights", str(checkpoint), "--data_path", str(knn_root),
                                "--resize_size", str(RESIZE_SIZE), "--crop_size", str(CROP_SIZE),
                                "--output_dir", str(output_dir), "--epochs", str(epochs), "--lr", str(lr),
                                "--batch_size_per_gpu", str(batch_size), "--num_workers", "0"])
    return results["history"][-1]["test_acc1"]


PROBE_EPOCHS = 30  # the grid probes' epochs on these small sets (cached features: the evaluation view, no augmentation)


def probe(checkpoint: Path, knn_root: Path, output_dir: Path, kind: str = "linear", epochs: int = PROBE_EPOCHS,
          batch_size: int = 128) -> dict[str, Any]:
    """eval_linear.py's probe of ``kind`` (linear, attentive, cross_attention) over its learning-rate grid (the
    DINO-style SGD recipe), chosen on a held-out tenth of ``knn_root/train``: top-1 (%) on ``knn_root/val`` of the
    chosen classifier, its learning rate, and the best of the grid on val (what choosing on val would report)."""
    results = eval_linear.main(["--pretrained_weights", str(checkpoint), "--data_path", str(knn_root), "--probe", kind,
                                "--recipe", "dino", "--epochs", str(epochs), "--train_augmentation", "false",
                                "--resize_size", str(RESIZE_SIZE), "--crop_size", str(CROP_SIZE),
                                "--output_dir", str(output_dir), "--batch_size_per_gpu", str(batch_size),
                                "--num_workers", "0"])
    return {"top1": results["chosen"]["val_acc1"], "lr": results["chosen"]["lr"],
            "best_on_val": max(point["val_acc1"] for point in results["grid"])}


def knn_run(data_set: DataSet, config: Configuration, seed: int, epochs: int, run_dir: Path, per_slot: bool = False,
            statistics_at_init: bool = False, keep_checkpoint: bool = False) -> dict[str, Any]:
    """Trains ``config`` on ``data_set`` and k-NN-evaluates its teacher on both evaluated splits, cached in
    ``run_dir/result.json`` (the output in ``train.log``). ``per_slot``: with the slot statistics on the evaluated
    images; ``statistics_at_init``: and those of the untrained model on the held-out images (``holdout_at_init``).
    ``seconds``: training and evaluation; the checkpoint is removed unless ``keep_checkpoint``."""
    def work() -> dict[str, Any]:
        training = training_run(data_set, run_dir, seed, epochs, config.flags)
        record: dict[str, Any] = {"data_set": data_set.name, "config": config.name, "seed": seed, "epochs": epochs}
        if statistics_at_init:
            record["holdout_at_init"] = slot_statistics(training.initial_backbone(), data_set.root / "holdout")
        started = time.perf_counter()
        record.update(training.train())
        record.update(knn_on_splits(training.checkpoint, data_set, run_dir, per_slot))
        record["seconds"] = time.perf_counter() - started
        if not keep_checkpoint:
            training.checkpoint.unlink()
        return record

    return cached_run(run_dir, work)
