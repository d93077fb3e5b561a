"""What the probes read from the frozen backbone, each batch's backbone pass computed once for all of them: the
linear probe's feature vectors (one or several feature sets, DINO's and DINOv2's layouts) and the attentive
probes' token matrix."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import UserError
from ...models.backbone import ReadoutBackbone
from ..slots import check_slots, slot_layout


class ProbeFeatures(nn.Module):
    """The frozen features the linear probe sees: the read-out's own part
    (:meth:`~dino_sparo.models.readouts.Readout.probe_features`: nothing for CLS, SPARO's encoding or the chosen
    ``slots`` of it at unit RMS per dimension, GAP's patch mean, ...), then the CLS tokens of the last
    ``n_last_blocks`` blocks (each through the final norm, DINO's protocol), and with ``avgpool_patchtokens`` the
    mean of the last block's patch tokens. With one CLS token, CLS and mean are interleaved dimension by dimension
    (``[c0, m0, c1, m1, ...]``) as DINO's eval_linear lays them out, so its trained linear weights evaluate
    correctly; with more blocks (which DINO cannot combine with the mean) the mean is appended.
    """

    def __init__(self, backbone: ReadoutBackbone, n_last_blocks: int, avgpool_patchtokens: bool,
                 slots: list[int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_last_blocks = n_last_blocks
        self.avgpool_patchtokens = avgpool_patchtokens
        self.slots = slots
        self.eval()
        with torch.no_grad():  # the read-out's share of the features, measured on a one-patch image
            probe = backbone.cls_token.new_zeros(1, 3, *backbone.patch_embed.patch_size)
            own = backbone.readout_module.probe_features(backbone.readout_tokens(backbone.tokens(probe)), slots)
        self.readout_dim = 0 if own is None else own.shape[1]
        self.feature_dim = self.readout_dim + backbone.embed_dim * (n_last_blocks + int(avgpool_patchtokens))

    @property
    def blocks_needed(self) -> int:
        """How many of the last blocks' outputs :meth:`from_tokens` reads."""
        return max(1, self.n_last_blocks)

    def describe(self) -> str:
        parts = []
        if self.readout_dim:
            slots = f" slots {','.join(map(str, self.slots))}" if self.slots is not None else ""
            parts.append(f"{self.backbone.readout.upper()} read-out{slots}")
        if self.n_last_blocks:
            parts.append(f"CLS tokens of the last {self.n_last_blocks} block(s)")
        if self.avgpool_patchtokens:
            parts.append("mean of the last block's patch tokens")
        return " + ".join(parts) + f" ({self.feature_dim} dims)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_tokens(self.backbone.get_intermediate_layers(images, self.blocks_needed))

    @torch.no_grad()
    def from_tokens(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """The features from the final-normed outputs of the last blocks (oldest first, at least
        :attr:`blocks_needed` of them), as :meth:`~dino_sparo.models.backbone.ReadoutBackbone.get_intermediate_layers`
        returns them."""
        own = self.backbone.readout_module.probe_features(self.backbone.readout_tokens(tokens[-1]), self.slots)
        features = [] if own is None else [own]
        cls_tokens = [t[:, 0] for t in tokens[-self.n_last_blocks:]] if self.n_last_blocks else []
        if self.avgpool_patchtokens:
            patch_mean = tokens[-1][:, self.backbone.num_prefix_tokens:].mean(dim=1)
            if len(cls_tokens) == 1:
                cls_tokens = [torch.stack((cls_tokens[0], patch_mean), dim=-1).flatten(1)]
            else:
                cls_tokens.append(patch_mean)
        return torch.cat(features + cls_tokens, dim=-1).float()


@dataclass(frozen=True)
class FeatureSet:
    """One linear-probe feature set: the CLS tokens of the last ``n_last_blocks`` blocks, with or without the
    mean patch token (besides the read-out's own part). Written ``N`` or ``N+avgpool`` on the command line."""
    n_last_blocks: int
    avgpool_patchtokens: bool = False

    @classmethod
    def parse(cls, text: str) -> FeatureSet:
        """argparse type of ``--feature_sets``: ``4``, ``1+avgpool``."""
        blocks, _, extra = text.partition("+")
        if extra not in ("", "avgpool") or not blocks.isdigit():
            raise argparse.ArgumentTypeError(f"expected N or N+avgpool (N = number of last blocks), got {text!r}")
        return cls(int(blocks), extra == "avgpool")

    def __str__(self) -> str:
        return f"{self.n_last_blocks}{'+avgpool' if self.avgpool_patchtokens else ''}"


def default_feature_set(backbone: ReadoutBackbone, n_last_blocks: int | None, avgpool_patchtokens: bool
                        ) -> FeatureSet:
    """``--n_last_blocks`` (default: the read-out's, capped at the blocks there are) and ``--avgpool_patchtokens``."""
    if n_last_blocks is None:
        n_last_blocks = min(backbone.readout_module.probe_cls_blocks, len(backbone.blocks))
    return FeatureSet(n_last_blocks, bool(avgpool_patchtokens))


def check_feature_set(feature_set: FeatureSet, backbone: ReadoutBackbone) -> None:
    if not 0 <= feature_set.n_last_blocks <= len(backbone.blocks):
        raise UserError(f"--n_last_blocks must be between 0 and the {len(backbone.blocks)} remaining blocks, "
                        f"got {feature_set.n_last_blocks}")


class LinearInputs(nn.Module):
    """Several linear-probe feature sets from one backbone pass per batch: ``forward(images)`` is the list of
    their (B, dim) features, in the order of ``feature_sets``."""

    def __init__(self, backbone: ReadoutBackbone, feature_sets: Sequence[FeatureSet],
                 slots: list[int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.sets = [ProbeFeatures(backbone, s.n_last_blocks, s.avgpool_patchtokens, slots) for s in feature_sets]
        self.blocks_needed = max(s.blocks_needed for s in self.sets)
        self.dims = [s.feature_dim for s in self.sets]

    def describe(self) -> list[str]:
        return [s.describe() for s in self.sets]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.backbone.get_intermediate_layers(images, self.blocks_needed)
        return [s.from_tokens(tokens) for s in self.sets]


class ProbeTokens(nn.Module):
    """The attentive probes' input: the backbone's final-normed output tokens (the tokens its read-out reads,
    whatever the read-out), patch tokens with the CLS token first unless ``cls`` is false, and the register
    tokens after it only with ``registers``. ``forward(images)`` is a one-element list, (B, N, D)."""

    def __init__(self, backbone: ReadoutBackbone, cls: bool = True, registers: bool = False) -> None:
        super().__init__()
        if registers and not backbone.num_registers:
            raise UserError("--probe_registers true: this model has no register tokens")
        self.backbone = backbone
        self.cls = cls
        self.registers = registers
        self.dims = [backbone.embed_dim]

    def describe(self) -> list[str]:
        names = (["CLS"] if self.cls else []) + (["registers"] if self.registers else []) + ["patch tokens"]
        joined = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
        return [f"{joined} of the last remaining block ({self.backbone.embed_dim} dims each)"]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.backbone.tokens(images)
        prefix = self.backbone.num_prefix_tokens
        kept = ([tokens[:, :1]] if self.cls else []) + ([tokens[:, 1:prefix]] if self.registers else [])
        return [torch.cat(kept + [tokens[:, prefix:]], dim=1).float()]


def build_probe_inputs(args: argparse.Namespace, backbone: ReadoutBackbone) -> LinearInputs | ProbeTokens:
    """The frozen inputs ``--probe`` reads: the linear probe's feature sets, or the tokens."""
    if args.probe != "linear":
        return ProbeTokens(backbone, cls=args.probe_cls is not False, registers=bool(args.probe_registers))
    sets = args.feature_sets or [default_feature_set(backbone, args.n_last_blocks, args.avgpool_patchtokens)]
    for feature_set in sets:
        check_feature_set(feature_set, backbone)
    slots = check_slots(args.slots, slot_layout(backbone, "--slots")[0]) if args.slots else None
    inputs = LinearInputs(backbone, sets, slots)
    if 0 in inputs.dims:
        raise UserError(f"--n_last_blocks 0 leaves the {backbone.readout.upper()} read-out without features: use >= 1")
    return inputs
