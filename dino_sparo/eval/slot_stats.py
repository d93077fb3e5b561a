"""Do the slots separate? One measurement of where SPARO's slots look, used by training (per epoch, on a fixed
batch), ``eval_knn.py --per_slot`` and ``visualize_sparo.py``.

For a slot's attention row a over the N tokens (token 0 is CLS) of an image:
- peakedness: 1 - H(p) / log P, p = a over the P patch tokens renormalised (0 = uniform, 1 = one patch);
- CLS weight: a on the CLS token (a slot near 1 barely looks at the image);
- max attention: the largest weight of a (1/N when uniform);
- slot-map similarity: the mean over slot pairs l != m of the cosine between their patch maps (1 = every slot
  looks at the same place; slots that copy one another show up here);
- high-norm share: the part of a's weight on high-norm tokens, those whose output norm (before the final norm)
  exceeds :data:`HIGH_NORM_FACTOR` times the median patch token's: the artefact tokens of Darcet et al. ("Vision
  Transformers Need Registers", ICLR 2024), which can draw attention away from the image; measured for each slot
  and for the CLS token's attention in the last remaining block.
Each is averaged over images; all but the similarity are also kept per slot.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HIGH_NORM_FACTOR = 2.0
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


def high_norm_tokens(norms: torch.Tensor, num_prefix_tokens: int = 1,
                     factor: float = HIGH_NORM_FACTOR) -> torch.Tensor:
    """(B, N) token norms -> (B, N) mask of the tokens whose norm exceeds ``factor`` times the median norm of the
    image's patch tokens (the tokens after the first ``num_prefix_tokens``)."""
    median = norms[:, num_prefix_tokens:].float().median(dim=1, keepdim=True).values
    return norms.float() > factor * median


def high_norm_share(attention: torch.Tensor, high_norm: torch.Tensor) -> torch.Tensor:
    """(B, M, N) attention and a (B, N) high-norm mask -> (B, M) attention weight on high-norm tokens."""
    return (attention.float() * high_norm[:, None].float()).sum(dim=-1)


@dataclass
class SlotStatistics:
    """Per-slot means over images (tensors of length L) and the mean slot-map similarity; the high-norm shares
    are None where the token norms were not measured."""
    peakedness: torch.Tensor
    cls_weight: torch.Tensor
    max_attention: torch.Tensor
    pairwise_similarity: float
    images: int
    high_norm_share: torch.Tensor | None = None
    cls_high_norm_share: float | None = None

    def summary(self) -> dict[str, float]:
        """Means over slots: the scalars logged during training."""
        summary = {"slot_peakedness": float(self.peakedness.mean()), "slot_cls_weight": float(self.cls_weight.mean()),
                   "slot_max_attention": float(self.max_attention.mean()),
                   "slot_pairwise_similarity": self.pairwise_similarity}
        if self.high_norm_share is not None:
            summary["slot_high_norm_share"] = float(self.high_norm_share.mean())
        if self.cls_high_norm_share is not None:
            summary["cls_high_norm_share"] = self.cls_high_norm_share
        return summary

    @staticmethod
    def mean(parts: list[SlotStatistics]) -> SlotStatistics:
        """The statistics of all images of ``parts`` together (e.g. images of different sizes, measured apart)."""
        total = sum(part.images for part in parts)

        def average(values: list) -> torch.Tensor | float | None:
            if any(value is None for value in values):
                return None
            return sum(value * part.images for value, part in zip(values, parts)) / total

        cls_share = average([p.cls_high_norm_share for p in parts])
        return SlotStatistics(average([p.peakedness for p in parts]), average([p.cls_weight for p in parts]),
                              average([p.max_attention for p in parts]),
                              float(average([p.pairwise_similarity for p in parts])), total,
                              average([p.high_norm_share for p in parts]),
                              None if cls_share is None else float(cls_share))

    def per_slot(self) -> list[dict[str, float]]:
        rows = [{"slot": slot, "peakedness": float(p), "cls_weight": float(c), "max_attention": float(m)}
                for slot, (p, c, m) in enumerate(zip(self.peakedness, self.cls_weight, self.max_attention))]
        if self.high_norm_share is not None:
            for row, share in zip(rows, self.high_norm_share):
                row["high_norm_share"] = float(share)
        return rows


def slot_statistics(attention: torch.Tensor, num_prefix_tokens: int = 1,
                    token_norms: torch.Tensor | None = None) -> SlotStatistics:
    """Statistics of slot attention ``attention`` (B, L, N) whose first ``num_prefix_tokens`` tokens are not
    patches (CLS); with the norms (B, N) of those tokens also each slot's high-norm share."""
    attention = attention.detach().float()
    patches = attention[..., num_prefix_tokens:]
    shares = None
    if token_norms is not None:
        shares = high_norm_share(attention, high_norm_tokens(token_norms, num_prefix_tokens)).mean(dim=0).cpu()
    return SlotStatistics(
        peakedness=peakedness(patches).mean(dim=0).cpu(),
        cls_weight=attention[..., :num_prefix_tokens].sum(dim=-1).mean(dim=0).cpu(),
        max_attention=attention.amax(dim=-1).mean(dim=0).cpu(),
        pairwise_similarity=float(pairwise_similarity(patches).mean()),
        images=attention.shape[0],
        high_norm_share=shares,
    )


@torch.no_grad()
def measure_slots(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str,
                  return_attention: bool = False) -> SlotStatistics | tuple[SlotStatistics, torch.Tensor]:
    """:func:`slot_statistics` of ``model``'s read-out maps over image ``batches`` (of one size), with the
    high-norm shares of each map and of the CLS token's last-block attention, in eval mode (restored afterwards);
    with ``return_attention`` also the maps (B, M, N), on the CPU."""
    was_training = model.training
    model.eval()
    try:
        found = [model.inspect(images.to(device, non_blocking=True)) for images in batches]
    finally:
        model.train(was_training)
    if not found:
        raise ValueError("no images to measure the slots on")
    if found[0].readout_maps is None:
        raise ValueError(f"the {model.readout!r} read-out has no attention maps to measure")

    def gathered(name: str) -> torch.Tensor:
        return torch.cat([getattr(part, name).float().cpu() for part in found])

    attention = gathered("readout_maps")
    stats = slot_statistics(attention, found[0].readout_prefix_tokens, gathered("readout_norms"))
    cls_high_norm = high_norm_tokens(gathered("token_norms"), found[0].prefix_tokens)
    stats.cls_high_norm_share = float(high_norm_share(gathered("cls_attention")[:, None], cls_high_norm).mean())
    return (stats, attention) if return_attention else stats
