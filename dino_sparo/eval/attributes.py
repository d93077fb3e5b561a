"""Attribute label sets: one label set per column of a CSV that describes every image (e.g. the demo's
``attributes.csv``), so the same features can be evaluated against several labels, not just the class folders.

The CSV has a ``path`` column relative to the data folder (``train/red/train_00001.png``) and one column per
attribute. A numeric column with more distinct values than bins is binned into quantiles of the *training*
images only, so the validation values never shape the labels. The train/val split is the folder's; each image
must appear exactly once.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError

PATH_COLUMN = "path"


@dataclass
class AttributeLabels:
    """One attribute as a label set: ``classes[label]`` names a label; labels are in dataset order."""
    name: str
    classes: list[str]
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    bin_edges: list[float] | None = None  # the inner quantile edges, for a binned numeric column

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def parse_columns(text: str) -> list[str]:
    """``shape,colour,size`` -> ``["shape", "colour", "size"]``; empty or repeated names are a :class:`UserError`."""
    columns = [name.strip() for name in text.split(",")]
    if not all(columns):
        raise UserError(f"--attribute_columns {text!r} has an empty name (expected e.g. shape,colour,size)")
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise UserError(f"--attribute_columns names {', '.join(repeated)} more than once")
    return columns


def read_attribute_rows(csv_path: str, columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """Normalised relative path -> {column: value} for ``columns``; a missing file, a missing ``path`` column, an
    unknown column, an empty value or a repeated path is a one-line :class:`UserError`."""
    if not os.path.isfile(csv_path):
        raise UserError(f"--attributes {csv_path} not found")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if PATH_COLUMN not in header:
            raise UserError(f"--attributes {csv_path} has no {PATH_COLUMN!r} column (columns: {', '.join(header)})")
        unknown = [name for name in columns if name not in header]
        if unknown:
            raise UserError(f"--attribute_columns {', '.join(unknown)} not in {csv_path} (columns: "
                            f"{', '.join(name for name in header if name != PATH_COLUMN)})")
        rows: dict[str, dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            path = os.path.normpath(row[PATH_COLUMN] or "")
            if path in rows:
                raise UserError(f"{csv_path} line {line}: {row[PATH_COLUMN]} appears more than once")
            values = {name: (row[name] or "").strip() for name in columns}
            empty = [name for name, value in values.items() if not value]
            if empty:
                raise UserError(f"{csv_path} line {line}: empty {', '.join(empty)} for {row[PATH_COLUMN]}")
            rows[path] = values
    if not rows:
        raise UserError(f"--attributes {csv_path} has no rows")
    return rows


def _as_numbers(values: Sequence[str]) -> np.ndarray | None:
    try:
        return np.array([float(value) for value in values])
    except ValueError:
        return None


def quantile_bins(train_values: np.ndarray, val_values: np.ndarray, bins: int
                  ) -> tuple[list[str], np.ndarray, np.ndarray, list[float]]:
    """Bins numbers into ``bins`` quantiles of ``train_values``: bins ``(-inf, e1], (e1, e2], ..., (e_last, inf)``.
    Edges that coincide are merged and an edge at the largest training value is moved below it, so a column with a
    few frequent values gets fewer bins rather than empty ones. Returns the bin names, both label arrays and the
    inner edges."""
    edges = np.quantile(train_values, np.arange(1, bins) / bins)
    top = train_values.max()
    # an edge at the largest value would leave the upper bin empty: move it to the value below
    edges = np.unique(np.where(edges < top, edges, train_values[train_values < top].max(initial=-np.inf)))
    edges = edges[np.isfinite(edges)]
    if not len(edges):
        return ["all"], np.zeros(len(train_values), int), np.zeros(len(val_values), int), []
    names = [f"<={edges[0]:.4g}"] + [f"({low:.4g}, {high:.4g}]" for low, high in zip(edges[:-1], edges[1:])]
    names.append(f">{edges[-1]:.4g}")
    # side="left": a value equal to an edge goes to the lower bin, as the names say
    return names, np.searchsorted(edges, train_values), np.searchsorted(edges, val_values), edges.tolist()


def attribute_labels(csv_path: str, columns: Sequence[str], bins: int, data_path: str,
                     train_paths: Sequence[str], val_paths: Sequence[str]) -> list[AttributeLabels]:
    """The label sets of ``columns`` for the images ``train_paths`` and ``val_paths`` (in dataset order).

    Every image needs a row and every row an image under ``data_path``: either kind of mismatch is a
    :class:`UserError` naming an example, so a CSV for another copy of the data is caught before any work.
    """
    if bins < 2:
        raise UserError(f"--attribute_bins must be at least 2, got {bins}")
    rows = read_attribute_rows(csv_path, columns)
    relative = {split: [os.path.normpath(os.path.relpath(path, data_path)) for path in paths]
                for split, paths in (("train", train_paths), ("val", val_paths))}
    images = set(relative["train"]) | set(relative["val"])
    missing_rows = [path for path in relative["train"] + relative["val"] if path not in rows]
    if missing_rows:
        raise UserError(f"{csv_path} has no row for {len(missing_rows)} image(s) under {data_path}, e.g. "
                        f"{missing_rows[0]}")
    missing_images = [path for path in rows if path not in images]
    if missing_images:
        raise UserError(f"{csv_path} has {len(missing_images)} row(s) for images not found under "
                        f"{data_path}/train or /val, e.g. {missing_images[0]}")
    label_sets = []
    for name in columns:
        train_values = [rows[path][name] for path in relative["train"]]
        val_values = [rows[path][name] for path in relative["val"]]
        numbers = _as_numbers(train_values + val_values)
        # a numeric column with no more distinct values than bins is already discrete: its values are the labels
        if numbers is not None and len(np.unique(numbers)) > bins:
            classes, train, val, edges = quantile_bins(numbers[:len(train_values)], numbers[len(train_values):], bins)
        else:
            classes = sorted(set(train_values) | set(val_values), key=float if numbers is not None else None)
            index = {value: position for position, value in enumerate(classes)}
            train = np.array([index[value] for value in train_values])
            val = np.array([index[value] for value in val_values])
            edges = None
        label_sets.append(AttributeLabels(name, classes, torch.as_tensor(train, dtype=torch.long),
                                          torch.as_tensor(val, dtype=torch.long), edges))
    return label_sets


def majority_chance(label_set: AttributeLabels) -> float:
    """The best top-1 (percent) any constant answer scores on val: the share of its most frequent label. A feature
    that knows nothing about the attribute does not beat it (this reads val labels, for the report only)."""
    if not len(label_set.val_labels):
        return 0.0
    return 100.0 * int(torch.bincount(label_set.val_labels).max()) / len(label_set.val_labels)
