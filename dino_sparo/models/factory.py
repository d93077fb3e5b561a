"""Building backbones from a :class:`~.config.ModelConfig`: with fresh weights, or frozen with every tensor loaded
from a checkpoint (the evaluations, visualisation, export and torch.hub)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..checkpoint import Weights, load_pretrained_weights, read_weights, summarise_keys
from ..errors import UserError
from .backbone import ReadoutBackbone
from .config import ModelConfig
from .dinov3 import DINOv3VisionTransformer
from .vision_transformer import VisionTransformer

logger = logging.getLogger(__name__)


def build_backbone(config: ModelConfig, drop_path_rate: float = 0.0) -> ReadoutBackbone:
    """The backbone ``config`` describes, freshly initialised: a :class:`~.dinov3.DINOv3VisionTransformer` for the
    dinov3 archs, else a :class:`~.vision_transformer.VisionTransformer`. An impossible combination (read-out
    heads that do not divide the width, more blocks replaced than there are, ...) is a :class:`UserError`."""
    backbone = DINOv3VisionTransformer if config.spec.family == "dinov3" else VisionTransformer
    try:
        return backbone(**config.spec.model_kwargs(), drop_path_rate=drop_path_rate, **config.model_kwargs())
    except ValueError as error:
        raise UserError(str(error)) from None


def build_pretrained_backbone(path: str, checkpoint_key: str, flags: Mapping[str, Any], verbose: bool = True
                              ) -> tuple[ReadoutBackbone, ModelConfig]:
    """The frozen backbone (eval mode, no gradients) of ``path``, every parameter loaded from it, and its config:
    :func:`backbone_from_weights` of the weights under ``checkpoint_key``."""
    if not path:
        raise UserError("--pretrained_weights is required (there is no download of official weights)")
    return backbone_from_weights(read_weights(path, checkpoint_key), flags, verbose)


def backbone_from_weights(weights: Weights, flags: Mapping[str, Any], verbose: bool = True
                          ) -> tuple[ReadoutBackbone, ModelConfig]:
    """The frozen backbone of weights read by :func:`~dino_sparo.checkpoint.read_weights`, and its config.

    The architecture comes from explicit ``flags`` (None: not given), else the checkpoint's saved args, else its
    weights: a DINO-format checkpoint without read-out tensors is evaluated with the CLS read-out unless
    ``--readout`` says otherwise. A missing or mis-shaped tensor is a :class:`UserError`: evaluating partly random
    weights is never meant. ``verbose``: log what was loaded.
    """
    path, checkpoint_key = weights.path, weights.key
    config = ModelConfig.resolve(flags, weights.saved_args, weights.backbone)
    if weights.saved_args is None and verbose:
        logger.info(f"{path} has no saved args: the architecture comes from its weights ({config.arch}/"
                    f"{config.patch_size}, depth {config.depth}, {config.readout.upper()} read-out; flags override)")
    model = build_backbone(config)
    described = ", ".join(f"{name}={value}" for name, value in config.readout_flags().items())
    report = load_pretrained_weights(model, weights, strict=True, verbose=False, architecture=described)
    if verbose:
        logger.info(f"loaded {len(report.loaded)} tensors from {path} (key {checkpoint_key!r}); model: {described}")
        if report.unused:
            logger.info(f"unused from the checkpoint: {summarise_keys(report.unused)}")
        for note in report.notes:
            logger.info(note)
    model.requires_grad_(False)
    model.eval()
    return model, config
