"""GradCAM weights (Selvaraju et al.): the spatial mean of the gradients."""

import torch


def gradcam_weights(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``activations`` ``[..., F, h, w]``, ``grads`` ``[..., F, h, w]`` -> weights ``[..., F]``."""
    return grads.mean(dim=(-2, -1))
