"""What every backbone does around its transformer blocks, whatever timm model holds them: the read-out at the end
(:data:`~.readouts.READOUTS`), retrofit freezing and the frozen prefix, features of the last blocks, and attention
inspection.

A backbone class (:class:`~.vision_transformer.VisionTransformer` for DINO's and DINOv2's absolute position
embeddings, :class:`~.dinov3.DINOv3VisionTransformer` for DINOv3's RoPE) mixes :class:`ReadoutBackbone` in before
its timm model and supplies :meth:`~ReadoutBackbone.prepare_tokens` (image to tokens),
:meth:`~ReadoutBackbone.block_kwargs` (what each block call needs besides the tokens: DINOv3's RoPE tables for the
patch grid), :meth:`~ReadoutBackbone.attention_weights` (a block's softmax attention) and
:meth:`~ReadoutBackbone.embedding_parameters`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import DropPath as TimmDropPath
from torch import nn

from .readouts import READOUTS, Readout

# Every read-out's options with their defaults: a model config carries them all, the chosen read-out reads its own.
READOUT_OPTION_DEFAULTS: dict[str, Any] = {option.flag: option.default for readout in READOUTS.values()
                                           for option in readout.options}


def replaced_blocks(readout: str, readout_replace_blocks: int | None) -> int:
    """Final blocks the read-out replaces: as given, else the read-out's own default (SPARO: 1, CLS: 0)."""
    return READOUTS[readout].replaced_blocks if readout_replace_blocks is None else readout_replace_blocks


def check_backbone_args(readout: str, readout_options: dict[str, Any], num_registers: int, depth: int,
                        readout_replace_blocks: int | None) -> int:
    """Raises ValueError/TypeError for arguments no backbone accepts; returns the number of replaced blocks."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {tuple(READOUTS)}, got {readout!r}")
    unknown = sorted(set(readout_options) - set(READOUT_OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown read-out option(s): {', '.join(unknown)}")
    if num_registers < 0:
        raise ValueError(f"num_registers must be >= 0, got {num_registers}")
    replaced = replaced_blocks(readout, readout_replace_blocks)
    if not 0 <= replaced < depth:
        raise ValueError(f"readout_replace_blocks must be in [0, depth-1] = [0, {depth - 1}], got {replaced}")
    return replaced


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016) drawn as the reference DINO draws it, one keep-or-drop per
    sample, with its rate held as data: a 0-dim buffer ``drop_prob`` rather than timm's Python float. Under
    ``torch.compile`` a float is a constant guarded on, so each block of its own rate would compile a graph of its
    own (and past the recompile limit, run eagerly); a buffer is an input, so blocks that differ only in their rate
    share one graph. The buffer is not saved: state dicts keep timm's keys."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.register_buffer("drop_prob", torch.tensor(float(drop_prob)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # Drawn in float32 (a bf16 draw would round keep + rand and skew the drop rate), as the reference:
        # floor(keep + U[0, 1)) is 1 with probability keep, then scaled so the expectation is x.
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device)).floor_() / keep
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={float(self.drop_prob):.3f}"


class ReadoutBackbone:
    """Mixin of the read-out and the block-level methods; see the module docstring for what a subclass supplies.
    Its ``__init__`` builds the timm model at full depth (so the stochastic-depth rates of the kept blocks are the
    original's), then calls :meth:`attach_readout`."""

    blocks: nn.Sequential
    norm: nn.Module
    num_prefix_tokens: int
    num_registers: int

    def attach_readout(self, readout: str, readout_options: dict[str, Any], replaced: int, embed_dim: int,
                       num_heads: int, readout_sees_registers: bool) -> None:
        """Drops the last ``replaced`` blocks, holds the stochastic-depth rates of the others as data
        (:class:`DropPath`) and adds the read-out as the attribute its ``state_prefix`` names."""
        self.readout_sees_registers = readout_sees_registers
        self.readout = readout
        if replaced:
            self.blocks = self.blocks[: len(self.blocks) - replaced]
        self._drop_rates_as_data()
        readout_class = READOUTS[readout]
        self._readout_attribute = readout_class.state_prefix
        readout_prefix_tokens = self.num_prefix_tokens if readout_sees_registers else 1
        self.add_module(readout_class.state_prefix, readout_class.from_config(
            {**READOUT_OPTION_DEFAULTS, **readout_options}, embed_dim, num_heads, readout_prefix_tokens))
        self.feature_dim = self.readout_module.output_dim

    def _drop_rates_as_data(self) -> None:
        """timm's drop paths replaced by :class:`DropPath` of the same rates. With stochastic depth on, the first
        block (rate 0, an ``Identity`` in timm) gets one too, so that every block has the same modules and one
        compiled graph serves them all; without it, every block keeps timm's ``Identity``."""
        if not any(isinstance(module, TimmDropPath) for module in self.blocks.modules()):
            return
        for block in self.blocks:
            for name in ("drop_path1", "drop_path2"):
                timm_module = getattr(block, name)
                setattr(block, name, DropPath(timm_module.drop_prob if isinstance(timm_module, TimmDropPath) else 0.0))

    # ------------------------------------------------------------------------------------ what subclasses supply
    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> tokens (B, 1 + registers + H*W/p^2, D) before any block."""
        raise NotImplementedError

    def block_kwargs(self, tokens: torch.Tensor, grid: tuple[int, int] | None) -> dict[str, Any]:
        """Keyword arguments of every block call on ``tokens`` of a (rows, cols) patch ``grid`` besides the tokens
        (none for absolute positions); ``grid`` is None where only the tokens are known (:meth:`forward_from`)."""
        return {}

    def attention_weights(self, block: nn.Module, normed: torch.Tensor, **block_kwargs: Any) -> torch.Tensor:
        """Softmax attention (B, heads, N, N) of ``block`` on its already normed input."""
        raise NotImplementedError

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The parameters before the first block (CLS token, registers, position embeddings) that freezing covers
        besides the patch embedding."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------- read-out
    @property
    def readout_module(self) -> Readout:
        """The read-out (also reachable by its state prefix, e.g. ``model.sparo``)."""
        return self._modules[self._readout_attribute]

    def readout_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens the read-out reads: CLS and patches, with the registers too only if it sees them."""
        if not self.num_registers or self.readout_sees_registers:
            return tokens
        return torch.cat([tokens[:, :1], tokens[:, self.num_prefix_tokens:]], dim=1)

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` of each transformer block (regional compilation); parameter names, hence checkpoints,
        do not change. The blocks share one code object and differ only in data (their weights and stochastic-depth
        rates, see :class:`DropPath`), so one graph per crop resolution and gradient mode serves every block:
        the student's global and local crops and the teacher's global crops make three, whatever the depth
        (frozen blocks, without stochastic depth or gradients, add theirs).

        Dynamo's DDP optimiser is turned off: it would split each compiled block at DistributedDataParallel's
        bucket boundaries, which gains nothing inside one block; DDP's own reducer still all-reduces each bucket
        once its gradients are ready."""
        torch._dynamo.config.optimize_ddp = False
        for block in self.blocks:
            block.compile(backend=backend, dynamic=False)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The tokens of images ``x`` before any block, and the keyword arguments of each block call on them."""
        tokens = self.prepare_tokens(x)
        patch_rows, patch_cols = self.patch_embed.patch_size
        return tokens, self.block_kwargs(tokens, (x.shape[-2] // patch_rows, x.shape[-1] // patch_cols))

    @staticmethod
    def run_blocks(tokens: torch.Tensor, blocks: Sequence[nn.Module], kwargs: dict[str, Any]) -> torch.Tensor:
        for block in blocks:
            tokens = block(tokens, **kwargs)
        return tokens

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed token outputs (B, N, D) of the remaining blocks (registers included)."""
        tokens, kwargs = self.embed(x)
        return self.norm(self.run_blocks(tokens, self.blocks, kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout_module(self.readout_tokens(self.tokens(x)))

    # ------------------------------------------------------------------------------------------------- retrofit
    def frozen_tokens(self, x: torch.Tensor, frozen_blocks: int) -> torch.Tensor:
        """Tokens after the embeddings and the first ``frozen_blocks`` blocks: the input of :meth:`forward_from`."""
        tokens, kwargs = self.embed(x)
        return self.run_blocks(tokens, self.blocks[:frozen_blocks], kwargs)

    def forward_from(self, tokens: torch.Tensor, frozen_blocks: int) -> torch.Tensor:
        """The read-out of ``tokens`` from :meth:`frozen_tokens` (``frozen_blocks`` blocks already applied) run
        through the remaining blocks: ``forward(x) == forward_from(frozen_tokens(x, k), k)`` for every k."""
        tokens = self.run_blocks(tokens, self.blocks[frozen_blocks:], self.block_kwargs(tokens, None))
        return self.readout_module(self.readout_tokens(self.norm(tokens)))

    def freeze_blocks(self, frozen_blocks: int) -> None:
        """Freezes the patch embedding, :meth:`embedding_parameters` and the first ``frozen_blocks`` blocks (no
        gradients), and turns off stochastic depth inside those blocks, whose outputs are then computed once and
        shared (see :class:`~dino_sparo.models.multicrop.MultiCropWrapper`)."""
        if not 0 <= frozen_blocks <= len(self.blocks):
            raise ValueError(f"cannot freeze {frozen_blocks} blocks: the model keeps {len(self.blocks)} before its "
                             f"read-out")
        for module in (self.patch_embed, *self.blocks[:frozen_blocks]):
            module.requires_grad_(False)
        for param in self.embedding_parameters():  # part of every frozen block's input, so frozen with them
            param.requires_grad_(False)
        self._frozen_drop_paths = []
        for block in self.blocks[:frozen_blocks]:
            self._frozen_drop_paths.append((block.drop_path1, block.drop_path2))
            block.drop_path1, block.drop_path2 = nn.Identity(), nn.Identity()

    def unfreeze_blocks(self) -> None:
        """Undoes :meth:`freeze_blocks`: every parameter trains again and the blocks get back their stochastic
        depth (the second stage of continued training)."""
        self.requires_grad_(True)
        for block, (drop_path1, drop_path2) in zip(self.blocks, getattr(self, "_frozen_drop_paths", [])):
            block.drop_path1, block.drop_path2 = drop_path1, drop_path2
        self._frozen_drop_paths = []

    # ------------------------------------------------------------------------------------------------ inspection
    def get_slot_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The read-out's attention maps over the tokens (B, M, N), one row per slot (SPARO); rows sum to 1."""
        if not self.readout_module.has_attention_maps:
            raise ValueError(f"get_slot_attention needs a read-out with attention maps; this model's read-out is "
                             f"{self.readout!r}")
        return self.readout_module.attention_maps(self.readout_tokens(self.tokens(x)))

    def inspect(self, x: torch.Tensor) -> TokenInspection:
        """One pass that shows where attention goes and which tokens stand out (the slot statistics use it)."""
        tokens, kwargs = self._before_last_block(x)
        last = self.blocks[-1]
        cls_attention = self.attention_weights(last, last.norm1(tokens), **kwargs)[:, :, 0].mean(dim=1)
        tokens = last(tokens, **kwargs)
        norms = tokens.float().norm(dim=-1)
        readout = self.readout_module
        maps = readout.attention_maps(self.readout_tokens(self.norm(tokens))) if readout.has_attention_maps else None
        return TokenInspection(maps, self.readout_tokens(norms.unsqueeze(-1))[..., 0], readout.num_prefix_tokens,
                               cls_attention, norms, self.num_prefix_tokens)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention (B, heads, N, N) of the last remaining transformer block."""
        tokens, kwargs = self._before_last_block(x)
        return self.attention_weights(self.blocks[-1], self.blocks[-1].norm1(tokens), **kwargs)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-normed token outputs (B, N, D) of the last ``n`` remaining blocks, oldest first."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in [1, {len(self.blocks)}], got {n}")
        tokens, kwargs = self.embed(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens, **kwargs)
            if index >= len(self.blocks) - n:
                outputs.append(self.norm(tokens))
        return outputs

    def _before_last_block(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        tokens, kwargs = self.embed(x)
        return self.run_blocks(tokens, self.blocks[:-1], kwargs), kwargs


@dataclass
class TokenInspection:
    """What :meth:`ReadoutBackbone.inspect` finds for a batch: the read-out's attention maps (B, M, N_r) over the
    N_r tokens it reads, whose first ``readout_prefix_tokens`` are not patches (None without maps), and those
    tokens' output norms (B, N_r); the CLS token's attention in the last remaining block, averaged over heads
    (B, N), over all N tokens (``prefix_tokens`` of them CLS and registers), and their output norms (B, N), taken
    before the final norm, where artefact tokens stand out (Darcet et al., 2024)."""
    readout_maps: torch.Tensor | None
    readout_norms: torch.Tensor
    readout_prefix_tokens: int
    cls_attention: torch.Tensor
    token_norms: torch.Tensor
    prefix_tokens: int
