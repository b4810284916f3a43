"""Scoring and tuning post-processing from CAM histograms, without recomputing any CAM.

Each (image, class) pair is reduced to two histograms of its CAM values over ``BINS`` equal
bins of [0, 1]: all pixels, and the pixels inside the true mask. For a threshold t = j / BINS
the predicted area and the intersection are the sums of bins j and above, exactly, so Dice for
every (threshold, confidence, min_seg_len) combination follows with numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import metrics
from ..postprocess import PostProcess

__all__ = ["BINS", "OBJECTIVES", "cam_histograms", "counts_at", "sweep", "Tuned", "DEFAULT_GRID"]

BINS = 100

DEFAULT_GRID = {
    "threshold": [j / BINS for j in range(5, 100, 5)],
    "confidence": [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    # fractions of the image area (0.1% of 256x1600 is 410 pixels)
    "min_seg_frac": [0.0, 0.0005, 0.001, 0.002, 0.005, 0.01],
}


def cam_histograms(cams: torch.Tensor, truth: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``cams float[B, C, H, W]`` in [0, 1], ``truth bool[B, C, H, W]`` ->
    (all-pixel histograms ``int64[B, C, BINS]``, inside-truth histograms ``int64[B, C, BINS]``)."""
    b, c = cams.shape[:2]
    idx = (cams * BINS).floor().clamp_(0, BINS - 1).long().reshape(b * c, -1)
    idx += torch.arange(b * c, device=idx.device).unsqueeze(1) * BINS
    flat = idx.reshape(-1)
    h_all = torch.bincount(flat, minlength=b * c * BINS)
    h_in = torch.bincount(flat, weights=truth.reshape(-1).to(torch.float64), minlength=b * c * BINS)
    return (h_all.reshape(b, c, BINS).cpu().numpy().astype(np.int64),
            h_in.reshape(b, c, BINS).cpu().numpy().round().astype(np.int64))


def _suffix(h: np.ndarray) -> np.ndarray:
    """[..., BINS] -> [..., BINS + 1]: element j = sum of bins >= j (pixels with cam >= j / BINS)."""
    s = np.cumsum(h[..., ::-1], axis=-1)[..., ::-1]
    return np.concatenate([s, np.zeros(h.shape[:-1] + (1,), dtype=s.dtype)], axis=-1)


def counts_at(h_all, h_in, true_area, probs, pp: PostProcess, image_area: int):
    """(intersection, predicted area, true area) ``[N, C]`` for one post-processing setting
    (thresholds are rounded to the histogram grid)."""
    n, c, _ = h_all.shape
    conf, thr, min_len = pp.arrays(c)
    j = np.clip(np.round(thr * BINS).astype(int), 0, BINS)
    area = np.take_along_axis(_suffix(h_all), np.broadcast_to(j[None, :, None], (n, c, 1)), -1)[..., 0]
    inter = np.take_along_axis(_suffix(h_in), np.broadcast_to(j[None, :, None], (n, c, 1)), -1)[..., 0]
    keep = (probs >= conf[None, :]) & (area >= min_len[None, :]) & (area > 0)
    return np.where(keep, inter, 0), np.where(keep, area, 0), true_area


@dataclass
class Tuned:
    """Best settings found by :func:`sweep`, with their scores on the data they were tuned on."""

    global_pp: PostProcess
    per_class_pp: PostProcess
    global_score: float
    per_class_score: float
    objective: str
    # Dice surface over the grid for plots: [C, T, Q, M] (mean per class over the scored images)
    surface: np.ndarray
    grid: dict

    def curves(self) -> dict:
        """Per class, Dice against the threshold at that class's tuned confidence and min_seg_len
        (the threshold-sweep plot): ``{"objective", "threshold": float[T], "dice": float[C][T],
        "chosen": float[C]}``, plain lists so a model card can hold it."""
        thr = np.asarray(self.grid["threshold"])
        conf = np.asarray(self.grid["confidence"])
        min_len = np.asarray(self.grid["min_seg_len"])
        c_conf, c_thr, c_min = self.per_class_pp.arrays(self.surface.shape[0])
        dice = []
        for c in range(self.surface.shape[0]):
            q = int(np.argmin(np.abs(conf - c_conf[c])))
            m = int(np.argmin(np.abs(min_len - c_min[c])))
            dice.append([round(float(v), 5) for v in self.surface[c, :, q, m]])
        return {"objective": self.objective, "threshold": thr.tolist(), "dice": dice,
                "chosen": [float(t) for t in c_thr]}


OBJECTIVES = ("kaggle", "paper", "positive")


def sweep(h_all, h_in, true_area, probs, image_area: int, grid: dict | None = None,
          objective: str = "kaggle") -> Tuned:
    """Grid search of (threshold, confidence, min_seg_len), globally and per class.

    ``objective``: "kaggle" (mean Dice over all (image, class) pairs of all images, clean ones
    included: the competition's metric, and the default), "paper" (the same over defective
    images only, as the paper's tables) or "positive" (mean over pairs with a true mask).
    ``probs`` gate each class against the confidence grid; pass 0/1 image labels to tune the
    threshold of a label-gated run.
    """
    grid = grid or DEFAULT_GRID
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    rows = true_area.sum(axis=1) > 0 if objective == "paper" else np.ones(len(true_area), bool)
    h_all, h_in, true_area, probs = h_all[rows], h_in[rows], true_area[rows], probs[rows]
    thr = np.asarray(grid["threshold"])
    conf = np.asarray(grid["confidence"])
    min_len = np.round(np.asarray(grid["min_seg_frac"]) * image_area).astype(np.int64)
    j = np.round(thr * BINS).astype(int)
    area = _suffix(h_all)[..., j]  # [N, C, T]
    inter = _suffix(h_in)[..., j]
    keep_c = probs[:, :, None] >= conf[None, None, :]  # [N, C, Q]
    keep_m = area[..., None] >= min_len  # [N, C, T, M]
    keep = keep_c[:, :, None, :, None] & keep_m[:, :, :, None, :] & (area > 0)[..., None, None]
    p_area = np.where(keep, area[..., None, None], 0)
    p_inter = np.where(keep, inter[..., None, None], 0)
    t_area = true_area[:, :, None, None, None]
    dice = metrics.dice_from_counts(p_inter, p_area, t_area)  # [N, C, T, Q, M]
    if objective in ("kaggle", "paper"):
        surface = dice.mean(axis=0)
    else:
        pos = (true_area > 0)[:, :, None, None, None]
        surface = (dice * pos).sum(axis=0) / np.maximum(pos.sum(axis=0), 1)
    overall = surface.mean(axis=0)  # [T, Q, M] (classes weigh equally: same images per class)
    t, q, m = np.unravel_index(np.argmax(overall), overall.shape)
    global_pp = PostProcess(confidence=float(conf[q]), threshold=float(thr[t]), min_seg_len=int(min_len[m]))
    best = [np.unravel_index(np.argmax(surface[c]), surface[c].shape) for c in range(surface.shape[0])]
    per_class_pp = PostProcess(confidence=[float(conf[b[1]]) for b in best],
                               threshold=[float(thr[b[0]]) for b in best],
                               min_seg_len=[int(min_len[b[2]]) for b in best])
    return Tuned(global_pp, per_class_pp, float(overall[t, q, m]),
                 float(np.mean([surface[c][b] for c, b in enumerate(best)])), objective, surface,
                 {"threshold": thr.tolist(), "confidence": conf.tolist(), "min_seg_len": min_len.tolist()})
