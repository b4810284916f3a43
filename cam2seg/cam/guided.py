"""Guided GradCAM: guided backpropagation times the upsampled CAM (paper, section II).

Guided backpropagation is the input gradient of a class logit where every activation gate
passes back only positive gradient: for ReLU that is pytorch-grad-cam's
``GuidedBackpropReLU`` (``g * (x > 0) * (g > 0)``); SiLU, ReLU6, Hardswish, GELU and
LeakyReLU gates get the same rule on their own derivative, ``max(0, act'(x) * g)``, since
timm's EfficientNets gate with SiLU. The model is never modified: a guided copy is built.

Unlike GradCAM this needs a full backward to the input for every class, so it is an option
(``method="guided-gradcam++"``) rather than the default.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["GATES", "guided_model", "guided_backprop", "guided_saliency", "GUIDED_METHODS"]

# Activation modules treated as gates. Sigmoid is left alone (in squeeze-excite blocks it
# scales channels rather than gating pixels), and so is the paper head's ELU, as the
# library leaves everything but ReLU.
GATES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU)
GUIDED_METHODS = {"guided-gradcam": "gradcam", "guided-gradcam++": "gradcam++"}


class _PositiveGrad(torch.autograd.Function):
    """Identity forward; backward passes only the positive part of the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class _Guided(nn.Module):
    """``act(x)`` whose gradient back to ``x`` is clamped at zero after ``act``'s own."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = copy.copy(act)
        if hasattr(self.act, "inplace"):
            self.act.inplace = False  # the clamp needs x itself, not an overwritten alias

    def forward(self, x):
        return self.act(_PositiveGrad.apply(x))


def _swap(module: nn.Module) -> int:
    n = 0
    for name, child in module.named_children():
        if isinstance(child, GATES):
            setattr(module, name, _Guided(child))
            n += 1
        else:
            n += _swap(child)
    return n


def guided_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode, same device) with every activation gate guided."""
    guided = copy.deepcopy(model).eval()
    if _swap(guided) == 0:
        raise ValueError(f"{type(model).__name__} has no activation modules of types "
                         f"{', '.join(g.__name__ for g in GATES)}: guided backpropagation needs them")
    for p in guided.parameters():
        p.requires_grad_(False)
    return guided


def guided_backprop(guided: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Guided input gradients of every class logit.

    ``guided``: from :func:`guided_model`; ``images`` ``float32[B, K, H, W]`` normalised
    (K input channels). Returns ``float32[B, C, K, H, W]`` (one full backward per class).
    """
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = guided(x)
        c = logits.shape[1]
        grads = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k < c - 1)[0] for k in range(c)]
    return torch.stack(grads, dim=1)


def guided_saliency(grads: torch.Tensor, quantile: float = 0.99) -> torch.Tensor:
    """``[B, C, K, H, W]`` guided gradients -> ``[B, C, H, W]`` pixel saliency in [0, 1].

    Magnitude summed over the input channels (one for a grey model, three for RGB), scaled by its ``quantile`` per map and clipped: the map's maximum
    is a single spiky pixel, which would leave the rest near zero.
    """
    s = grads.abs().sum(dim=2)
    flat = s.flatten(-2)
    k = max(1, min(flat.shape[-1], int(round(quantile * flat.shape[-1]))))
    scale = flat.kthvalue(k, dim=-1).values.clamp(min=1e-12)[..., None, None]
    return (s / scale).clamp_(max=1.0)
