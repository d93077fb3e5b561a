"""dino_sparo: DINO self-supervised pretraining of Vision Transformers with a SPARO read-out."""

__version__ = "0.1.0"
