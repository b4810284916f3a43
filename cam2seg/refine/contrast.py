"""Contrast gating: keep the part of a map where the image differs from its own background.

The CAM says *where* a defect is, at the encoder's stride; the pixels a defect changed stand out
from the strip around them. Per image: the background is a median filter whose window is a
fraction of the image height (large enough that a defect does not pull its own median, as in
the reading notes' "median-filtered background" check), each pixel's deviation from it is
measured in robust sigmas (1.4826 x the median absolute deviation of the image), and ramps
from 0 at ``z_low`` to 1 at ``z_high``. The refined map is ``map ** cam_power * ramp``: the
square root keeps a defect's pixels alive where the coarse map is only lukewarm.

The median is taken on the image shrunk so that the window spans about 15 pixels, then
resized back: the background is smooth, and this keeps the cost at a few thousand values per
pixel at most, in torch on the actor's device. Every statistic is per image. A colour image is gated
per channel, and a pixel opens where any channel stands out (a defect may change hue, not
brightness).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["contrast", "gate", "background"]

_MEDIAN_SPAN = 15  # window side, in pixels of the shrunk image
_MAD_TO_SIGMA = 1.4826


def background(image: torch.Tensor, window: float) -> torch.Tensor:
    """Median background ``float[B, C, H, W]`` of ``image`` ``float[B, C, H, W]`` (each channel
    on its own), the window ``window`` x H on a side (reflected at the borders)."""
    b, c, h, w = image.shape
    side = max(3, int(round(window * h)))
    factor = max(1, side // _MEDIAN_SPAN)
    small = F.avg_pool2d(image, factor, ceil_mode=True) if factor > 1 else image
    k = max(3, (side // factor) | 1)  # odd
    pad = k // 2
    sh, sw = small.shape[-2:]
    mode = "reflect" if min(sh, sw) > pad else "replicate"
    patches = F.unfold(F.pad(small, (pad, pad, pad, pad), mode=mode), k)  # [B, C*k*k, sh*sw]
    med = patches.reshape(b, c, k * k, sh * sw).median(dim=2).values.reshape(b, c, sh, sw)
    return F.interpolate(med, size=(h, w), mode="bilinear", align_corners=False) if factor > 1 else med


def gate(image: torch.Tensor, window: float, z_low: float, z_high: float) -> torch.Tensor:
    """The gate ``float32[B, 1, H, W]`` in [0, 1] of ``image`` ``float[B, C, H, W]``: 0 up to
    ``z_low`` robust sigmas from the background, 1 from ``z_high``, linear between (per channel,
    then the largest over channels)."""
    image = image.float()
    dev = (image - background(image, window)).abs()
    sigma = _MAD_TO_SIGMA * dev.flatten(2).median(dim=2).values.clamp(min=1e-6)  # [B, C]
    z = (dev / sigma[:, :, None, None]).amax(dim=1, keepdim=True)
    return ((z - z_low) / (z_high - z_low)).clamp_(0, 1)


def contrast(maps: torch.Tensor, image: torch.Tensor, window: float = 0.8, z_low: float = 2.5,
             z_high: float = 6.0, cam_power: float = 0.5, cache: dict | None = None) -> torch.Tensor:
    """``maps`` ``float[B, C, H, W]`` in [0, 1] gated by how far each pixel of ``image``
    ``float[B, 1 or 3, H, W]`` (grey or RGB; same H, W, any scale) stands out from its background; returns
    ``float32[B, C, H, W]`` in [0, 1]. ``cache``: a dict for these images only, where the gate
    is kept for the next call with the same setting."""
    if maps.ndim != 4 or image.ndim != 4 or image.shape[1] not in (1, 3):
        raise ValueError(f"maps must be [B, C, H, W] and image [B, 1 or 3, H, W], got {tuple(maps.shape)}, "
                         f"{tuple(image.shape)}")
    if maps.shape[0] != image.shape[0] or maps.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} and image {tuple(image.shape)} differ in batch or size")
    if not 0 < window <= 4 or not 0 <= z_low < z_high or cam_power <= 0:
        raise ValueError(f"need 0 < window <= 4, 0 <= z_low < z_high and cam_power > 0; got {window}, {z_low}, "
                         f"{z_high}, {cam_power}")
    key = ("contrast", window, z_low, z_high)
    ramp = None if cache is None else cache.get(key)
    if ramp is None:
        ramp = gate(image, window, z_low, z_high)
        if cache is not None:
            cache[key] = ramp
    return (maps.float().clamp(0, 1) ** cam_power * ramp).clamp_(0, 1)
