"""Training targets from pseudo-masks: what the segmenter is told, pixel by pixel.

Pseudo-masks are wrong in known ways: CAM blobs spill over defect edges, the classifier's
gate lets through classes the image does not hold, and a class it missed has an empty mask
although the image-level label says a defect is there. Each refinement below turns such
pixels into 0 (background) or :data:`IGNORE` (left out of the loss)
instead of teaching the network the error. All take and return plain arrays.
"""

from __future__ import annotations

import cv2
import numpy as np

from .. import rle

IGNORE = -1  # target value of pixels left out of the loss (cam2seg/models/losses.py skips them)

__all__ = ["IGNORE", "refine_targets", "edge_band", "build_targets"]


def edge_band(mask: np.ndarray, radius: int) -> np.ndarray:
    """``bool[H, W]``: pixels within ``radius`` of the mask's edge, inside or outside."""
    if radius <= 0 or not mask.any():
        return np.zeros(mask.shape, bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    m = mask.astype(np.uint8)
    return cv2.dilate(m, kernel).astype(bool) & ~cv2.erode(m, kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)


def refine_targets(masks: np.ndarray, labels: np.ndarray | None = None, *, absent_zero: bool = True,
                   present_empty: str = "ignore", ignore_band: int = 0) -> np.ndarray:
    """``masks bool[C, H, W]`` (pseudo-masks of one image) -> targets ``int8[C, H, W]`` in {0, 1, IGNORE}.

    ``labels uint8[C]``: the image-level label (None: unknown; only ``ignore_band`` applies).
    ``absent_zero``: a class the label says is absent is all 0 whatever its pseudo-mask.
    ``present_empty``: a class the label says is present but whose pseudo-mask is empty is
    all IGNORE ("ignore": where the defect is is unknown) or all 0 ("empty").
    ``ignore_band``: pixels within this many pixels of a kept mask's edge are IGNORE.
    """
    masks = np.asarray(masks, bool)
    if present_empty not in ("ignore", "empty"):
        raise ValueError(f"present_empty must be ignore or empty, got {present_empty!r}")
    out = masks.astype(np.int8)
    for c in range(masks.shape[0]):
        if labels is not None and absent_zero and not labels[c]:
            out[c] = 0
            continue
        if labels is not None and labels[c] and not masks[c].any():
            out[c] = IGNORE if present_empty == "ignore" else 0
            continue
        if ignore_band:
            out[c][edge_band(masks[c], ignore_band)] = IGNORE
    return out


def build_targets(rles: list[list[str]], shapes: list[tuple[int, int]], size: tuple[int, int],
                  labels: list[list[int]] | None, cfg) -> np.ndarray:
    """Targets ``int8[N, C, h, w]`` at ``size`` from per-image, per-class RLE at each image's
    original ``shapes``; ``labels`` (image-level, ``[N][C]``) switch the pseudo-mask
    refinements on (None: true masks, used as they are; a None entry: that image's masks are
    true masks), with the settings ``cfg`` has
    (``absent_zero``, ``present_empty``, ``ignore_band``: a SegmenterConfig or its fields)."""
    n, c = len(rles), len(rles[0]) if rles else 0
    out = np.zeros((n, c, *size), np.int8)
    for i, (per_class, (h, w)) in enumerate(zip(rles, shapes)):
        masks = np.zeros((c, *size), bool)
        for k, r in enumerate(per_class):
            if r:
                m = rle.decode(r, h, w)
                if (h, w) != tuple(size):
                    m = cv2.resize(m.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
                masks[k] = m
        if labels is None or labels[i] is None:
            out[i] = masks
        else:
            out[i] = refine_targets(masks, np.asarray(labels[i]), absent_zero=cfg.absent_zero,
                                    present_empty=cfg.present_empty, ignore_band=cfg.ignore_band)
    return out
