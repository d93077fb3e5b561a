"""Models: DINO's, DINOv2's and DINOv3's ViTs built from timm, their read-outs (:mod:`.readouts`: SPARO, CLS, ...),
the DINO head, the multi-crop wrapper; the model config (:mod:`.config`), its flags (:mod:`.flags`), inference from
weights (:mod:`.inference`) and building (:mod:`.factory`)."""
from __future__ import annotations

from .config import ModelConfig
from .factory import build_backbone, build_pretrained_backbone
from .head import DINOHead
from .multicrop import MultiCropWrapper
from .readouts import READOUTS, SPARO, Readout
from .vision_transformer import ARCHS, VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = ["ARCHS", "READOUTS", "SPARO", "DINOHead", "ModelConfig", "MultiCropWrapper", "Readout",
           "VisionTransformer", "build_backbone", "build_pretrained_backbone", "vit_base", "vit_small", "vit_tiny"]
