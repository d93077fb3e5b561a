"""torch.hub entry points: this project's backbones, with a SPARO read-out unless ``readout=`` says otherwise::

    model = torch.hub.load("path/to/dino_sparo", "dino_sparo_vits16", source="local")            # random weights
    model = torch.hub.load("path/to/dino_sparo", "dino_sparo_vits16", source="local",
                           pretrained="runs/demo/checkpoint.pth")     # or an export's .safetensors, or a URL

``pretrained`` is False (random weights, nothing read) or the path or URL of one of this project's checkpoints or
exports (``python -m dino_sparo.export``), or of official DINO / DINOv2 / DINOv3 weights, as ``--pretrained_weights``
reads them. Only a URL touches the network; it is downloaded once into torch.hub's cache. Keyword arguments are model
flags (``readout="cls"``, ``sparo_slots=32``, ``depth=6``, ...) and override what a checkpoint saved. The model
comes back in eval mode with its gradients on.
"""
from __future__ import annotations

import os as _os
from typing import Any as _Any

dependencies = ["torch", "timm", "safetensors"]
# torch.hub.list names every public callable of this module: what is not an entry point is imported under a leading
# underscore or inside a function.


def _local_copy(location: str) -> str:
    """A URL is downloaded once into torch.hub's cache; a path is returned as it is."""
    from urllib.parse import urlparse

    if urlparse(location).scheme not in ("http", "https"):
        return location
    import torch

    target = _os.path.join(torch.hub.get_dir(), "checkpoints", _os.path.basename(urlparse(location).path))
    if not _os.path.isfile(target):
        _os.makedirs(_os.path.dirname(target), exist_ok=True)
        torch.hub.download_url_to_file(location, target, progress=True)
    return target


def _backbone(arch: str, patch_size: int, pretrained: bool | str, checkpoint_key: str, flags: dict[str, _Any]):
    from dino_sparo.models import ModelConfig, build_backbone, build_pretrained_backbone

    given = {"arch": arch, "patch_size": patch_size, **flags}
    if not pretrained:
        return build_backbone(ModelConfig.resolve(given)).eval()
    if pretrained is True:
        raise ValueError("pretrained=True needs a path or URL: this project publishes no weights of its own")
    model, _ = build_pretrained_backbone(_local_copy(_os.fspath(pretrained)), checkpoint_key, given)
    return model.requires_grad_(True)


def _entry(arch: str, patch_size: int, description: str):
    def entry(pretrained: bool | str = False, checkpoint_key: str = "teacher", **flags: _Any):
        return _backbone(arch, patch_size, pretrained, checkpoint_key, flags)

    entry.__doc__ = (f"{description} (--arch {arch} --patch_size {patch_size}), SPARO read-out by default. "
                     f"pretrained: False, or a path or URL of weights; flags: model flags such as readout='cls'.")
    return entry


dino_sparo_vits16 = _entry("vit_small", 16, "DINO ViT-S/16")
dino_sparo_vits8 = _entry("vit_small", 8, "DINO ViT-S/8")
dino_sparo_vitb16 = _entry("vit_base", 16, "DINO ViT-B/16")
dino_sparo_vitb8 = _entry("vit_base", 8, "DINO ViT-B/8")
dino_sparo_vits14_dinov2 = _entry("dinov2_vits14", 14, "DINOv2 ViT-S/14")
dino_sparo_vitb14_dinov2 = _entry("dinov2_vitb14", 14, "DINOv2 ViT-B/14")
dino_sparo_vitl14_dinov2 = _entry("dinov2_vitl14", 14, "DINOv2 ViT-L/14")
dino_sparo_vitg14_dinov2 = _entry("dinov2_vitg14", 14, "DINOv2 ViT-g/14")
dino_sparo_vits14_reg_dinov2 = _entry("dinov2_vits14_reg", 14, "DINOv2 ViT-S/14 with 4 registers")
dino_sparo_vitb14_reg_dinov2 = _entry("dinov2_vitb14_reg", 14, "DINOv2 ViT-B/14 with 4 registers")
dino_sparo_vitl14_reg_dinov2 = _entry("dinov2_vitl14_reg", 14, "DINOv2 ViT-L/14 with 4 registers")
dino_sparo_vitg14_reg_dinov2 = _entry("dinov2_vitg14_reg", 14, "DINOv2 ViT-g/14 with 4 registers")
dino_sparo_vits16_dinov3 = _entry("dinov3_vits16", 16, "DINOv3 ViT-S/16 (RoPE, 4 storage tokens)")
dino_sparo_vitb16_dinov3 = _entry("dinov3_vitb16", 16, "DINOv3 ViT-B/16 (RoPE, 4 storage tokens)")
dino_sparo_vitl16_dinov3 = _entry("dinov3_vitl16", 16, "DINOv3 ViT-L/16 (RoPE, 4 storage tokens)")
