"""Which slot knows what: k-NN top-1 of every single SPARO slot on every attribute (the slot x attribute matrix),
how specialised the slots are, and the paper's concept selection made for one attribute and read on all of them.

Every function takes this rank's contiguous shards of features and labels, like
:func:`~dino_sparo.eval.knn.sharded_knn`, and returns the same result on every rank.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..models.readouts import restrict_to_slots
from .attributes import AttributeLabels
from .knn import sharded_knn
from .slots import per_slot_knn, select_slots

ALL_SLOTS = "all slots"


def attribute_knn(train_features: torch.Tensor, test_features: torch.Tensor, label_sets: Sequence[AttributeLabels],
                  ks: Sequence[int], T: float) -> dict[str, dict[int, tuple[float, float]]]:
    """k-NN top-1/top-5 of the features on each attribute: attribute -> k -> (top-1, top-5)."""
    return {labels.name: sharded_knn(train_features, labels.train_labels, test_features, labels.val_labels, ks, T,
                                     labels.num_classes)
            for labels in label_sets}


@dataclass
class SlotAttributeMatrix:
    """Val top-1 (percent) of each slot alone on each attribute, plus whole-encoding rows (``all slots``, a
    comparison model), at one k; ``chance`` is the majority-label level of each attribute."""
    attributes: list[str]
    chance: dict[str, float]
    slots: dict[int, dict[str, float]]
    k: int
    val_images: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def gain(self, slot: int, attribute: str) -> float:
        """The slot's accuracy above chance as a share of the possible gain (0 = chance, 1 = perfect): comparable
        across attributes with different numbers of labels."""
        chance = self.chance[attribute]
        return (self.slots[slot][attribute] - chance) / max(100.0 - chance, 1e-9)

    def best_attribute(self, slot: int) -> str:
        return max(self.attributes, key=lambda attribute: self.gain(slot, attribute))

    def slot_order(self) -> list[int]:
        """Slots grouped by their best attribute (in column order), best first within a group."""
        return sorted(self.slots, key=lambda slot: (self.attributes.index(self.best_attribute(slot)),
                                                    -self.gain(slot, self.best_attribute(slot)), slot))

    def specialisation(self) -> dict[str, float]:
        """For each attribute: the best single slot's top-1 minus the median slot's (points)."""
        scores = {}
        for attribute in self.attributes:
            values = np.array([row[attribute] for row in self.slots.values()])
            scores[attribute] = float(values.max() - np.median(values))
        return scores

    def rank_correlations(self) -> dict[str, float | None]:
        """Spearman correlation across slots between every two attributes (``a~b``); None when one attribute
        has the same accuracy in every slot (no ranking to correlate)."""
        ranks = {attribute: _ranks([row[attribute] for row in self.slots.values()]) for attribute in self.attributes}
        pairs = {}
        for i, first in enumerate(self.attributes):
            for second in self.attributes[i + 1:]:
                a, b = ranks[first] - ranks[first].mean(), ranks[second] - ranks[second].mean()
                norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
                pairs[f"{first}~{second}"] = float((a * b).sum() / norm) if norm > 0 else None
        return pairs

    def mean_rank_correlation(self) -> float | None:
        values = [value for value in self.rank_correlations().values() if value is not None]
        return float(np.mean(values)) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "split": "val", "val_images": self.val_images, "attributes": self.attributes,
                "chance": self.chance, "slot_order": self.slot_order(),
                "slots": [{"slot": slot, "best_attribute": self.best_attribute(slot), "top1": self.slots[slot]}
                          for slot in self.slot_order()],
                "rows": self.rows, "specialisation": self.specialisation(),
                "rank_correlations": self.rank_correlations(), "mean_rank_correlation": self.mean_rank_correlation()}

    def table(self) -> str:
        width = max(8, *(len(name) + 1 for name in self.attributes))
        header = f"{'':>10}" + "".join(f"{name:>{width}}" for name in self.attributes)
        line = lambda label, values: f"{label:>10}" + "".join(f"{values[name]:>{width}.1f}" for name in self.attributes)
        lines = [header] + [line(f"slot {slot}", self.slots[slot]) for slot in self.slot_order()]
        lines += [line(name, values) for name, values in self.rows.items()]
        lines += [line("chance", self.chance), line("best-median", self.specialisation())]
        return "\n".join(lines)


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (as Spearman's correlation needs)."""
    values = np.asarray(values, dtype=float)
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def slot_attribute_matrix(train_features: torch.Tensor, test_features: torch.Tensor,
                          label_sets: Sequence[AttributeLabels], chance: dict[str, float], num_slots: int,
                          slot_dim: int, k: int, T: float) -> SlotAttributeMatrix:
    """The matrix of every single slot on every attribute, with the row ``all slots`` (the whole encoding)."""
    slots: dict[int, dict[str, float]] = {slot: {} for slot in range(num_slots)}
    for labels in label_sets:
        for score in per_slot_knn(train_features, labels.train_labels, test_features, labels.val_labels, num_slots,
                                  slot_dim, k, T, labels.num_classes):
            slots[score.slot][labels.name] = score.top1
    val_images = sum(distributed.all_gather_sizes(test_features.shape[0]))
    matrix = SlotAttributeMatrix([labels.name for labels in label_sets], chance, slots, k, val_images)
    matrix.rows[ALL_SLOTS] = top1_row(train_features, test_features, label_sets, k, T)
    return matrix


def top1_row(train_features: torch.Tensor, test_features: torch.Tensor, label_sets: Sequence[AttributeLabels],
             k: int, T: float) -> dict[str, float]:
    """Top-1 of the whole features on each attribute at one k: a row of the matrix."""
    return {name: scores[k][0] for name, scores in attribute_knn(train_features, test_features, label_sets, [k],
                                                                 T).items()}


def select_for_attribute(train_features: torch.Tensor, test_features: torch.Tensor,
                         label_sets: Sequence[AttributeLabels], target: str, count: int, num_slots: int,
                         slot_dim: int, slot_k: int, ks: Sequence[int], T: float, holdout_fraction: float,
                         seed: int) -> dict[str, Any]:
    """The paper's intervention for one concept: the ``count`` slots best at ``target`` on a held-out part of
    train (validation labels are never passed to the choice), then val top-1 on every attribute for those slots
    and for all slots."""
    by_name = {labels.name: labels for labels in label_sets}
    chosen = by_name[target]
    selection = select_slots(train_features, chosen.train_labels, count, num_slots, slot_dim, slot_k, T,
                             chosen.num_classes, holdout_fraction, seed)
    selected = attribute_knn(restrict_to_slots(train_features, selection.slots, slot_dim),
                             restrict_to_slots(test_features, selection.slots, slot_dim), label_sets, ks, T)
    every = attribute_knn(train_features, test_features, label_sets, ks, T)
    return {
        "select_for": target, "selected": selection.slots, "k": slot_k, "holdout_size": selection.holdout_size,
        "holdout_fraction": holdout_fraction, "seed": seed,
        "holdout_scores": [vars(score) for score in selection.holdout_scores],
        "val_images": sum(distributed.all_gather_sizes(test_features.shape[0])),
        "per_attribute": {name: {"selected": {str(k): selected[name][k][0] for k in ks},
                                 "all_slots": {str(k): every[name][k][0] for k in ks}} for name in by_name},
    }


def selection_table(selection: dict[str, Any]) -> str:
    """Val top-1 on each attribute of the selected slots against all slots, for every k."""
    ks = list(next(iter(selection["per_attribute"].values()))["selected"])
    width = max(10, *(len(name) + 1 for name in selection["per_attribute"]))
    lines = [f"{'attribute':>{width}}" + "".join(f"{'sel k=' + k:>10}{'all k=' + k:>10}{'diff':>7}" for k in ks)]
    for name, scores in selection["per_attribute"].items():
        cells = "".join(f"{scores['selected'][k]:>10.1f}{scores['all_slots'][k]:>10.1f}"
                        f"{scores['selected'][k] - scores['all_slots'][k]:>+7.1f}" for k in ks)
        lines.append(f"{name + ('*' if name == selection['select_for'] else ''):>{width}}{cells}")
    return "\n".join(lines)
