"""Do the slots separate? One measurement of where SPARO's slots look, used by training (per epoch, on a fixed
batch), ``eval_knn.py --per_slot`` and ``visualize_sparo.py``.

For a slot's attention row a over the N tokens (token 0 is CLS) of an image:
- peakedness: 1 - H(p) / log P, p = a over the P patch tokens renormalised (0 = uniform, 1 = one patch);
- CLS weight: a on the CLS token (a slot near 1 barely looks at the image);
- max attention: the largest weight of a (1/N when uniform);
- slot-map similarity: the mean over slot pairs l != m of the cosine between their patch maps (1 = every slot
  looks at the same place; slots that copy one another show up here).
Each is averaged over images; the first three are also kept per slot.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PEAKEDNESS_HELP = ("peakedness is 1 - H(p) / log(P), with p the slot's attention over the P patches "
                   "(CLS token left out, renormalised) and H its entropy: 0 for uniform attention, 1 for a single "
                   "patch; averaged over the images")


def peakedness(patch_attention: torch.Tensor) -> torch.Tensor:
    """(..., P) attention over patches -> (...) in [0, 1]; see :data:`PEAKEDNESS_HELP`."""
    count = patch_attention.shape[-1]
    if count == 1:
        return torch.ones(patch_attention.shape[:-1], device=patch_attention.device)
    p = patch_attention / patch_attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    return (1.0 - entropy / math.log(count)).clamp(0.0, 1.0)


def pairwise_similarity(patch_attention: torch.Tensor) -> torch.Tensor:
    """(B, L, P) patch maps -> (B,) mean cosine between the maps of distinct slots (1 for a single slot)."""
    slots = patch_attention.shape[1]
    if slots == 1:
        return torch.ones(patch_attention.shape[0], device=patch_attention.device)
    unit = F.normalize(patch_attention.float(), dim=-1)
    cosines = unit @ unit.transpose(1, 2)  # (B, L, L), ones on the diagonal
    return (cosines.sum(dim=(1, 2)) - slots) / (slots * (slots - 1))


@dataclass
class SlotStatistics:
    """Per-slot means over images (tensors of length L) and the mean slot-map similarity."""
    peakedness: torch.Tensor
    cls_weight: torch.Tensor
    max_attention: torch.Tensor
    pairwise_similarity: float
    images: int

    def summary(self) -> dict[str, float]:
        """Means over slots: the scalars logged during training."""
        return {"slot_peakedness": float(self.peakedness.mean()), "slot_cls_weight": float(self.cls_weight.mean()),
                "slot_max_attention": float(self.max_attention.mean()),
                "slot_pairwise_similarity": self.pairwise_similarity}

    @staticmethod
    def mean(parts: list[SlotStatistics]) -> SlotStatistics:
        """The statistics of all images of ``parts`` together (e.g. images of different sizes, measured apart)."""
        total = sum(part.images for part in parts)

        def average(values: list) -> torch.Tensor | float:
            return sum(value * part.images for value, part in zip(values, parts)) / total

        return SlotStatistics(average([p.peakedness for p in parts]), average([p.cls_weight for p in parts]),
                              average([p.max_attention for p in parts]),
                              float(average([p.pairwise_similarity for p in parts])), total)

    def per_slot(self) -> list[dict[str, float]]:
        return [{"slot": slot, "peakedness": float(p), "cls_weight": float(c), "max_attention": float(m)}
                for slot, (p, c, m) in enumerate(zip(self.peakedness, self.cls_weight, self.max_attention))]


def slot_statistics(attention: torch.Tensor, num_prefix_tokens: int = 1) -> SlotStatistics:
    """Statistics of slot attention ``attention`` (B, L, N) whose first ``num_prefix_tokens`` tokens are not
    patches (CLS)."""
    attention = attention.detach().float()
    patches = attention[..., num_prefix_tokens:]
    return SlotStatistics(
        peakedness=peakedness(patches).mean(dim=0).cpu(),
        cls_weight=attention[..., :num_prefix_tokens].sum(dim=-1).mean(dim=0).cpu(),
        max_attention=attention.amax(dim=-1).mean(dim=0).cpu(),
        pairwise_similarity=float(pairwise_similarity(patches).mean()),
        images=attention.shape[0],
    )


@torch.no_grad()
def measure_slots(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str,
                  return_attention: bool = False) -> SlotStatistics | tuple[SlotStatistics, torch.Tensor]:
    """:func:`slot_statistics` of a SPARO ``model`` (``get_slot_attention``) over image ``batches``, in eval mode
    (restored afterwards); with ``return_attention`` also the maps (B, L, N), on the CPU."""
    was_training = model.training
    model.eval()
    try:
        maps = [model.get_slot_attention(images.to(device, non_blocking=True)).float().cpu() for images in batches]
    finally:
        model.train(was_training)
    if not maps:
        raise ValueError("no images to measure the slots on")
    attention = torch.cat(maps)
    stats = slot_statistics(attention, model.num_prefix_tokens)
    return (stats, attention) if return_attention else stats
