"""GradCAM++ weights (Chattopadhyay et al., eq. 19), as pytorch-grad-cam computes them."""

import torch

EPS = 1e-6


def gradcam_plusplus_weights(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``activations`` ``[..., F, h, w]``, ``grads`` ``[..., F, h, w]`` -> weights ``[..., F]``.

    alpha = g^2 / (2 g^2 + sum(A) g^3), zero where the gradient is zero; the weight is the
    spatial sum of alpha * relu(g).
    """
    g2 = grads * grads
    g3 = g2 * grads
    sum_a = activations.sum(dim=(-2, -1), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (torch.relu(grads) * alpha).sum(dim=(-2, -1))
