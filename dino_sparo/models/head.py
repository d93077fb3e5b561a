"""DINO projection head: MLP, L2 normalisation, weight-normalised prototype layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """``in_dim -> hidden_dim -> ... -> bottleneck_dim``, L2-normalise, then ``last_layer`` to ``out_dim``.

    ``last_layer`` is weight-normalised with ``torch.nn.utils.parametrizations.weight_norm``; its magnitude
    is fixed to 1 (not trained) when ``norm_last_layer``. Reference state dicts carrying
    ``last_layer.weight_g`` / ``last_layer.weight_v`` load unchanged: the parametrization maps those keys.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(width_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
