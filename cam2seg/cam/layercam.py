"""LayerCAM weights (Jiang et al., 2021), as pytorch-grad-cam computes them."""

import torch


def layercam_weights(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``activations`` ``[..., F, h, w]``, ``grads`` ``[..., F, h, w]`` -> weights ``[..., F, h, w]``.

    Each location keeps its own positive gradient instead of one weight per channel, which is
    why LayerCAM stays faithful on the shallow, high-resolution stages that fused maps use.
    """
    return torch.relu(grads)
