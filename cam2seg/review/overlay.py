"""Pictures of masks and maps over an image, for people to look at (arrays in, arrays out).

Every function takes the image as ``uint8[H, W]`` (grey) or ``uint8[H, W, 3]`` (RGB) and
returns ``uint8[H, W, 3]`` RGB at the image's size; masks are ``bool[H, W]``, maps
``float[H, W]`` in [0, 1] at the same size.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["CLASS_COLORS", "rgb", "mask_overlay", "heatmap_overlay", "stack_panels"]

# Severstal-style class colours (RGB): 1 yellow, 2 cyan, 3 magenta, 4 orange.
CLASS_COLORS = [(255, 215, 0), (0, 220, 220), (230, 0, 230), (255, 120, 0), (80, 220, 80), (80, 120, 255)]


def rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1).astype(np.uint8)
    return image[..., :3].astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, color=(255, 215, 0), alpha: float = 0.35) -> np.ndarray:
    """The mask tinted over the image with its outline drawn solid, so thin and small regions
    stay visible where a fill alone would vanish."""
    out = rgb(image).copy()
    mask = np.asarray(mask, bool)
    if mask.shape != out.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {out.shape[:2]}")
    col = np.asarray(color, np.float32)
    out[mask] = ((1 - alpha) * out[mask] + alpha * col).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(v) for v in color), 1)
    return out


def heatmap_overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """A CAM in [0, 1] as a jet heatmap blended with the image (pytorch-grad-cam's own
    ``show_cam_on_image``, so pictures look like the library's)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    base = rgb(image).astype(np.float32) / 255.0
    cam = np.clip(np.asarray(cam, np.float32), 0, 1)
    if cam.shape != base.shape[:2]:
        raise ValueError(f"map {cam.shape} does not match image {base.shape[:2]}")
    return show_cam_on_image(base, cam, use_rgb=True, image_weight=image_weight)


def stack_panels(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """RGB panels of one width stacked top to bottom with white gaps (strip images are wide)."""
    if not panels:
        raise ValueError("no panels to stack")
    w = panels[0].shape[1]
    if any(p.shape[1] != w for p in panels):
        raise ValueError("panels differ in width")
    rows = []
    for i, p in enumerate(panels):
        if i:
            rows.append(np.full((gap, w, 3), 255, np.uint8))
        rows.append(rgb(p))
    return np.concatenate(rows, axis=0)
