"""Parameter groups, optimizers and the gradient/EMA operations of a DINO step."""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def get_params_groups(model: nn.Module, readout_options: Mapping[str, Any] | None = None) -> list[dict]:
    """DINO's groups: weights (decayed, ``regularized``; group 0) and biases / 1-D parameters (no decay).

    The read-out of each backbone in ``model`` has the last word on its own parameters
    (:meth:`~dino_sparo.models.readouts.Readout.parameter_group`, given the run's ``readout_options``, those of a
    :class:`~dino_sparo.models.ModelConfig`): a learning-rate multiplier other than 1 puts them in groups of their
    own (``lr_mult``), and it may exempt some from decay. Without options, or with the read-outs' defaults, these
    are exactly the reference's two groups.
    """
    from .models.readouts import Readout

    rules: dict[str, Any] = {}  # parameter name -> (the read-out that owns it, its name there)
    if readout_options is not None:
        for module_name, module in model.named_modules():
            if isinstance(module, Readout):
                for name, _ in module.named_parameters():
                    rules[f"{module_name}.{name}" if module_name else name] = (module, name)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult, decayed = 1.0, None
        if name in rules:
            readout, own_name = rules[name]
            lr_mult, decayed = readout.parameter_group(readout_options, own_name, param)
        if decayed is None:
            decayed = not (name.endswith(".bias") or param.ndim == 1)
        groups.setdefault((lr_mult, decayed), []).append(param)
    result = [{"params": groups.pop((1.0, True), []), "regularized": True},
              {"params": groups.pop((1.0, False), []), "regularized": False, "weight_decay": 0.0}]
    for (lr_mult, decayed), params in sorted(groups.items(), key=lambda item: (item[0][0], not item[0][1])):
        group = {"params": params, "lr_mult": lr_mult}
        group.update({"regularized": True} if decayed else {"regularized": False, "weight_decay": 0.0})
        result.append(group)
    return result


def unfrozen_param_groups(model: nn.Module, names: Collection[str], layerwise_decay: float = 1.0) -> list[dict]:
    """Parameter groups of the parameters ``names`` of ``model`` (a multi-crop wrapper) that a freeze held, for
    continued training's second stage: marked ``backbone`` (they follow the backbone's learning rate), decayed by
    DINO's rule, and with DINOv2's layer-wise decay: block i of the n blocks gets ``layerwise_decay ** (n - i)`` as
    its ``lr_mult``, the patch embedding, tokens and position embeddings ``layerwise_decay ** (n + 1)``."""
    blocks = len(model.backbone.blocks)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if name not in names:
            continue
        match = re.match(r"^backbone\.blocks\.(\d+)\.", name)
        layer = int(match.group(1)) + 1 if match else 0
        decayed = not (name.endswith(".bias") or param.ndim == 1)
        groups.setdefault((layer, decayed), []).append(param)
    return [{"params": params, "backbone": True, "lr_mult": layerwise_decay ** (blocks + 1 - layer),
             "regularized": decayed, **({} if decayed else {"weight_decay": 0.0})}
            for (layer, decayed), params in sorted(groups.items())]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio; 1-D parameters get neither decay nor adaptation."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim != 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                param.add_(mu, alpha=-group["lr"])


def build_optimizer(name: str, param_groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """``adamw`` (fused kernels on CUDA, foreach elsewhere), ``sgd`` (momentum 0.9) or ``lars``; lr and
    weight decay are set every iteration by the schedules."""
    if name == "adamw":
        if device.type == "cuda":
            return torch.optim.AdamW(param_groups, fused=True)
        return torch.optim.AdamW(param_groups, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=0, momentum=0.9, foreach=True)
    if name == "lars":
        return LARS(param_groups)
    raise ValueError(f"unknown optimizer {name!r}")


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """Clips each parameter's gradient to norm <= ``clip`` on its own (DINO's per-parameter clipping), with
    foreach kernels and no host synchronisation."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    # All scales in two kernels (stack, then one division and clamp), not two tiny kernels per parameter.
    norms = torch.stack(torch._foreach_norm(grads))
    scales = (clip / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drops the head's last-layer gradients during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def update_teacher(student_params: Iterable[torch.Tensor], teacher_params: Iterable[torch.Tensor],
                   momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, over parameters only, with foreach kernels."""
    student_params, teacher_params = list(student_params), list(teacher_params)
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)
