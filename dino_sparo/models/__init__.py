"""Models: DINO's ViTs built from timm, their read-outs (:mod:`.readouts`: SPARO, CLS, ...), the DINO head, the
multi-crop wrapper, and the architecture flags, their resolution and model building (:mod:`.config`)."""
from __future__ import annotations

from .config import MODEL_DEFAULTS, build_backbone, build_pretrained_backbone
from .head import DINOHead
from .multicrop import MultiCropWrapper
from .readouts import READOUTS, SPARO, Readout
from .vision_transformer import ARCHS, VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = ["ARCHS", "MODEL_DEFAULTS", "READOUTS", "SPARO", "DINOHead", "MultiCropWrapper", "Readout",
           "VisionTransformer", "build_backbone", "build_pretrained_backbone", "vit_base", "vit_small", "vit_tiny"]
