"""Pixel-adaptive refinement (PAR): propagate each map over the image's local intensity affinities.

The CAM knows *where* a defect is but only at the encoder's stride (a 64x400 image is 2x13
cells); the image knows which pixels differ. PAR, the refinement step of AFA and ToCo (and
PAMR in 1-stage-wseg), repeatedly replaces every pixel's map value by a weighted mean of its
neighbours at several dilations, with weights that are high for neighbours of similar
intensity. Map values thus spread within regions of like intensity and stop at edges: a
defect that differs from the strip keeps its own value, the background around it takes the
background's. No training, no new dependency.

Per pixel i and neighbour j (8 directions at each dilation d):

    affinity_ij = softmax_j( -(|I_j - I_i| / (w_intensity * std_j(I))) ** 2 )
                  + w_position * softmax_j( -(dist_ij / (w_intensity * std_j(dist))) ** 2 )

normalised to sum 1 over j, then ``iterations`` times ``map_i <- sum_j affinity_ij map_j``. For a
colour image the intensity term averages the squared, per-channel scaled differences over the
three channels, so an edge in hue stops the map as an edge in brightness does, and an image
whose three channels are equal refines as its grey one.
The position term is AFA's: a small pull towards near neighbours. Dilations stay small by
default (1, 2, 4, 8) so that 1-2 pixel scratches are not averaged into the background.

Everything is computed per image from its own pixels (no statistic crosses the batch), so
batch size and order never change a result. Borders replicate the edge pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["par", "OFFSETS"]

# the 8 directions, (dy, dx)
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifts(x: torch.Tensor, dilations: Sequence[int], pad: int):
    """Yield ``x`` [B, C, H, W] moved by each (dilation x direction), replicate-padded."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    for d in dilations:
        for dy, dx in OFFSETS:
            y0, x0 = pad + dy * d, pad + dx * d
            yield xp[..., y0 : y0 + h, x0 : x0 + w]


def affinities(image: torch.Tensor, dilations: Sequence[int], w_intensity: float = 0.3,
               w_position: float = 0.01) -> torch.Tensor:
    """Neighbour weights ``float32[B, K, H, W]`` (K = 8 x len(dilations), summing to 1 over K)
    of a grey ``image`` ``float[B, 1, H, W]`` or an RGB one ``float[B, 3, H, W]``."""
    pad = max(dilations)
    if image.shape[1] == 1:
        neighbours = torch.cat(list(_shifts(image, dilations, pad)), dim=1)  # [B, K, H, W]
        scale = neighbours.std(dim=1, keepdim=True).mul_(w_intensity).add_(1e-8)
        # in place on the one [B, K, H, W] buffer (most of PAR's cost): 2x faster than fresh tensors
        logits = neighbours.sub_(image).abs_().div_(scale).square_().neg_()
    else:
        neighbours = torch.stack(list(_shifts(image, dilations, pad)), dim=1)  # [B, K, 3, H, W]
        scale = neighbours.std(dim=1, keepdim=True).mul_(w_intensity).add_(1e-8)
        logits = neighbours.sub_(image[:, None]).div_(scale).square_().mean(dim=2).neg_()
    aff = torch.softmax(logits, dim=1)
    del neighbours, logits
    dist = torch.tensor([d * (dy * dy + dx * dx) ** 0.5 for d in dilations for dy, dx in OFFSETS],
                        dtype=image.dtype, device=image.device)
    pos = torch.softmax(-(dist / (w_intensity * dist.std() + 1e-8)) ** 2, dim=0)
    aff.add_(w_position * pos[None, :, None, None])
    return aff.div_(aff.sum(dim=1, keepdim=True))


def par(maps: torch.Tensor, image: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8), iterations: int = 10,
        w_intensity: float = 0.3, w_position: float = 0.01, cache: dict | None = None) -> torch.Tensor:
    """Refine ``maps`` ``float[B, C, H, W]`` in [0, 1] on ``image`` ``float[B, 1 or 3, H, W]`` (any
    scale: the affinities are scale-free) of the same H, W; returns ``float32[B, C, H, W]`` in [0, 1].

    Each output pixel is a convex combination of input map values, so the range is kept.
    ``cache``: a dict for these images only, where the affinities are kept for the next call
    with the same setting (several refinements of one batch compute them once)."""
    if maps.ndim != 4 or image.ndim != 4 or image.shape[1] not in (1, 3):
        raise ValueError(f"maps must be [B, C, H, W] and image [B, 1 or 3, H, W], got {tuple(maps.shape)}, "
                         f"{tuple(image.shape)}")
    if maps.shape[0] != image.shape[0] or maps.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} and image {tuple(image.shape)} differ in batch or size")
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be positive integers, got {list(dilations)}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    image = image.float()
    out = maps.float()
    if iterations == 0:
        return out.clone()
    key = ("par", tuple(dilations), w_intensity, w_position)
    aff = None if cache is None else cache.get(key)
    if aff is None:
        aff = affinities(image, dilations, w_intensity, w_position)  # [B, K, H, W]
        if cache is not None:
            cache[key] = aff
    pad = max(dilations)
    for _ in range(iterations):
        new = torch.zeros_like(out)
        for k, shifted in enumerate(_shifts(out, dilations, pad)):
            new.addcmul_(shifted, aff[:, k : k + 1])
        out = new
    return out.clamp_(0, 1)
