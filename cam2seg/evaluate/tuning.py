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

__all__ = ["BINS", "OBJECTIVES", "cam_histograms", "counts_at", "sweep", "Tuned", "constrained_sweep", "Constrained",
           "DEFAULT_GRID"]

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


def _grid(h_all, h_in, true_area, probs, image_area: int, grid: dict):
    """Pair Dice ``float[N, C, T, Q, M]`` and masked ``bool[N, C, T, Q, M]`` (a non-empty mask
    kept) at every grid point, with the grid's (threshold, confidence, min_seg_len) arrays."""
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
    return metrics.dice_from_counts(p_inter, p_area, t_area), keep, (thr, conf, min_len)


def _grid_dict(thr, conf, min_len) -> dict:
    return {"threshold": thr.tolist(), "confidence": conf.tolist(), "min_seg_len": min_len.tolist()}


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
    dice, _, (thr, conf, min_len) = _grid(h_all, h_in, true_area, probs, image_area, grid)
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
                 _grid_dict(thr, conf, min_len))


@dataclass
class Constrained:
    """What :func:`constrained_sweep` chose per class: the setting, and at it the Kaggle mean over
    all images, the positive-pair Dice, the share of absent pairs masked (``float[C]`` each),
    whether the class met both bounds (``bool[C]``) and the floor in force (``float[C]``: the
    relative floor times the class's best positive-pair Dice on the grid)."""

    pp: PostProcess
    kaggle: np.ndarray
    positive: np.ndarray
    absent_masked: np.ndarray
    met: np.ndarray
    floor: np.ndarray
    grid: dict

    def summary(self) -> dict:
        """Plain lists, for a model card."""
        return {"kaggle": self.kaggle.round(5).tolist(), "positive": self.positive.round(5).tolist(),
                "absent_masked": self.absent_masked.round(5).tolist(), "met": self.met.tolist(),
                "floor": self.floor.round(5).tolist()}


#: the steps by which a class's positive-pair floor is lowered when the ceiling cannot be met at it
RELAXED = (1.0, 0.75, 0.5, 0.25)


def constrained_sweep(h_all, h_in, true_area, probs, image_area: int, grid: dict | None = None, *,
                      floor: float = 0.8, ceiling: float = 0.02) -> Constrained:
    """Per class, the grid point with the best Kaggle mean over all images among those whose
    positive-pair Dice is at least ``floor`` times the class's best positive-pair Dice on the
    grid and that mask at most ``ceiling`` of the class's absent pairs; so no class is switched
    off to win the Kaggle mean (an all-empty class has positive-pair Dice 0, under any floor > 0).

    A class where no point meets both keeps the ceiling and lowers its floor in steps
    (:data:`RELAXED`: 3/4, 1/2, 1/4 of it), never to zero: an image without labels is better left
    clean than masked where nothing is. Where even the lowest floor leaves no point under the
    ceiling, it keeps that floor and masks as few absent pairs as it can. ``met`` says which
    classes met both bounds as given, ``floor`` the floor in force. A class with no positive pair
    has no floor; one with no absent pair no ceiling. Shapes as :func:`sweep`'s inputs; ``probs``
    the gate's scores.
    """
    if not 0.0 <= floor <= 1.0 or not 0.0 <= ceiling <= 1.0:
        raise ValueError(f"floor and ceiling must lie in [0, 1], got {floor} and {ceiling}")
    grid = grid or DEFAULT_GRID
    dice, keep, (thr, conf, min_len) = _grid(h_all, h_in, true_area, probs, image_area, grid)
    pos = (true_area > 0)[:, :, None, None, None]
    absent = ~pos
    kaggle = dice.mean(axis=0)  # [C, T, Q, M]
    positive = (dice * pos).sum(axis=0) / np.maximum(pos.sum(axis=0), 1)
    masked = (keep & absent).sum(axis=0) / np.maximum(absent.sum(axis=0), 1)
    c = kaggle.shape[0]
    choice, met, floors = [], np.zeros(c, bool), np.zeros(c)
    for k in range(c):
        best = positive[k].max()
        under = masked[k] <= ceiling + 1e-12
        for step in RELAXED:
            floors[k] = floor * step * best
            # "on": at the floor and, when the class has positive pairs, not switched off
            on = (positive[k] >= floors[k] - 1e-12) & ((positive[k] > 0) | (best == 0))
            if (on & under).any():
                score = np.where(on & under, kaggle[k], -np.inf)
                met[k] = step == 1.0
                break
        else:  # fewest absent pairs masked over the lowest floor, then the best Kaggle mean among those
            least = np.where(on, masked[k], np.inf).min()
            score = np.where(on & (masked[k] <= least + 1e-12), kaggle[k], -np.inf)
        choice.append(np.unravel_index(np.argmax(score), score.shape))
    pp = PostProcess(confidence=[float(conf[b[1]]) for b in choice], threshold=[float(thr[b[0]]) for b in choice],
                     min_seg_len=[int(min_len[b[2]]) for b in choice])
    at = lambda a: np.array([a[k][b] for k, b in enumerate(choice)])  # noqa: E731
    return Constrained(pp, at(kaggle), at(positive), at(masked), met, floors, _grid_dict(thr, conf, min_len))
