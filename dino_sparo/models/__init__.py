"""Models: the SPARO read-out, DINO's ViTs built from timm, the DINO head and the multi-crop wrapper."""
from __future__ import annotations

from .head import DINOHead
from .multicrop import MultiCropWrapper
from .sparo import SPARO
from .vision_transformer import ARCHS, READOUTS, VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = ["ARCHS", "READOUTS", "SPARO", "DINOHead", "MultiCropWrapper", "VisionTransformer", "build_backbone",
           "vit_base", "vit_small", "vit_tiny"]


def build_backbone(arch: str, **kwargs) -> VisionTransformer:
    """Builds ``arch`` (one of :data:`ARCHS`) with ``VisionTransformer`` keyword arguments."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return VisionTransformer(**{**ARCHS[arch], **kwargs})
