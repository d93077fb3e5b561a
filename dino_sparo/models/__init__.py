"""Models: the SPARO read-out, DINO's ViTs built from timm, the DINO head, the multi-crop wrapper, and the one
place architectures are configured (:mod:`dino_sparo.models.config`)."""
from __future__ import annotations

from .config import MODEL_DEFAULTS, build_backbone, build_pretrained_backbone
from .head import DINOHead
from .multicrop import MultiCropWrapper
from .sparo import SPARO
from .vision_transformer import ARCHS, READOUTS, VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = ["ARCHS", "MODEL_DEFAULTS", "READOUTS", "SPARO", "DINOHead", "MultiCropWrapper", "VisionTransformer",
           "build_backbone", "build_pretrained_backbone", "vit_base", "vit_small", "vit_tiny"]
