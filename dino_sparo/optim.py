"""Parameter groups, optimizers and the gradient/EMA operations of a DINO step."""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

# The SPARO tensors whose product sets the attention temperature: decaying them cools every slot's softmax.
_SPARO_TEMPERATURE = re.compile(r"(^|\.)sparo\.(queries|key_proj\.weight|value_proj\.weight)$")


def get_params_groups(model: nn.Module, sparo_lr_mult: float = 1.0, sparo_weight_decay: bool = True) -> list[dict]:
    """DINO's groups: weights (decayed, ``regularized``; group 0) and biases / 1-D parameters (no decay).

    With ``sparo_lr_mult`` != 1 the SPARO read-out's parameters get groups of their own whose learning rate is
    that multiple of the schedule's (``lr_mult``); with ``sparo_weight_decay`` false its queries and key/value
    projections are not decayed. The defaults give exactly the reference's two groups.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        readout = sparo_lr_mult != 1.0 and (name.startswith("sparo.") or ".sparo." in name)
        decayed = not (name.endswith(".bias") or param.ndim == 1)
        if not sparo_weight_decay and _SPARO_TEMPERATURE.search(name):
            decayed = False
        groups.setdefault((readout, decayed), []).append(param)
    result = [{"params": groups.get((False, True), []), "regularized": True},
              {"params": groups.get((False, False), []), "weight_decay": 0.0}]
    if (True, True) in groups:
        result.append({"params": groups[(True, True)], "regularized": True, "lr_mult": sparo_lr_mult})
    if (True, False) in groups:
        result.append({"params": groups[(True, False)], "weight_decay": 0.0, "lr_mult": sparo_lr_mult})
    return result


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
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(clip / (norm + 1e-6), max=1.0) for norm in norms]
    torch._foreach_mul_(grads, scales)


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
