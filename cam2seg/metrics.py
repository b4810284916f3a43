"""Segmentation and classification metrics, with the baselines every Dice table carries.

Dice is computed from per-(image, class) counts (intersection, predicted area, true area),
so whole archives are scored without holding their masks, and the two trivial baselines
come from the true areas alone:

* **Kaggle mean**: Dice per (image, class) pair, 1 for empty/empty and 0 for empty/non-empty,
  averaged over all pairs. Two of them: over **all images** (the competition's metric: clean
  images count, so a mask on a clean image costs), and over the **defective images** only
  (the paper's Tables 2 and 3).
* **Positive-pair Dice**: the mean over the pairs whose true mask is non-empty; it measures
  localisation alone: on archives where most pairs are empty, the all-empty baseline scores
  a high Kaggle mean while finding nothing, so the Kaggle mean alone misleads.
* Baselines: *all-empty* (predict nothing), and *whole image* (predict every pixel for each
  class the classifier accepts, i.e. probability >= confidence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "pair_counts",
    "dice",
    "dice_from_counts",
    "DiceScores",
    "score_dice",
    "baseline_counts",
    "dice_with_baselines",
    "format_dice_table",
    "roc_auc",
    "format_auc_table",
]


def pair_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, predicted area, true area) over the last two axes, each int64[...]."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} vs {truth.shape}")
    if pred.ndim < 2:
        raise ValueError(f"masks must be [..., H, W], got {pred.shape}")
    axes = (-2, -1)
    return (
        np.logical_and(pred, truth).sum(axis=axes, dtype=np.int64),
        pred.sum(axis=axes, dtype=np.int64),
        truth.sum(axis=axes, dtype=np.int64),
    )


def dice_from_counts(inter, pred_area, true_area) -> np.ndarray:
    """Dice = 2|P∩T| / (|P| + |T|), with empty/empty = 1."""
    inter = np.asarray(inter, dtype=np.float64)
    total = np.asarray(pred_area, dtype=np.float64) + np.asarray(true_area, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), 1.0)
    return out


def dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice per mask over the last two axes: ``bool[..., H, W]`` x2 -> ``float64[...]``; empty/empty = 1."""
    return dice_from_counts(*pair_counts(pred, truth))


@dataclass
class DiceScores:
    """Per-class and overall Dice of one method on one set of images.

    ``kaggle[c]``: mean over all pairs of class c; ``positive[c]``: mean over pairs of class c
    whose true mask is non-empty (NaN when there are none). ``kaggle_mean`` averages all pairs
    (every class weighs by its number of images); ``positive_mean`` all positive pairs. These
    four cover the scored images (the defective ones, by default). Over every image given,
    clean ones included: ``kaggle_all_mean`` (the competition's mean) and ``absent_masked``,
    the share of pairs with an empty true mask that got a mask (NaN when there are none).
    """

    kaggle: np.ndarray
    positive: np.ndarray
    kaggle_mean: float
    positive_mean: float
    n_images: int
    n_positive: np.ndarray = field(repr=False)
    kaggle_all_mean: float = float("nan")
    absent_masked: float = float("nan")


def score_dice(per_pair: np.ndarray, true_area: np.ndarray, defective_only: bool = True) -> DiceScores:
    """Summarise ``float[N, C]`` pair Dice given ``int[N, C]`` true areas.

    ``defective_only`` keeps the images with at least one non-empty true mask (the paper's metric).
    """
    per_pair = np.asarray(per_pair, dtype=np.float64)
    positive = np.asarray(true_area) > 0
    if per_pair.shape != positive.shape or per_pair.ndim != 2:
        raise ValueError(f"expected matching [N, C] arrays, got {per_pair.shape} and {positive.shape}")
    kaggle_all = float(per_pair.mean()) if per_pair.size else float("nan")
    # an absent pair scores 1 exactly when nothing was predicted
    absent_masked = float((per_pair[~positive] < 1).mean()) if (~positive).any() else float("nan")
    if defective_only:
        keep = positive.any(axis=1)
        per_pair, positive = per_pair[keep], positive[keep]
    n, c = per_pair.shape
    n_pos = positive.sum(axis=0)
    with np.errstate(invalid="ignore"):
        kaggle = per_pair.mean(axis=0) if n else np.full(c, np.nan)
        pos = np.where(n_pos > 0, (per_pair * positive).sum(axis=0) / np.maximum(n_pos, 1), np.nan)
    return DiceScores(
        kaggle=kaggle,
        positive=pos,
        kaggle_mean=float(per_pair.mean()) if n else float("nan"),
        positive_mean=float(per_pair[positive].mean()) if positive.any() else float("nan"),
        n_images=n,
        n_positive=n_pos,
        kaggle_all_mean=kaggle_all,
        absent_masked=absent_masked,
    )


def baseline_counts(true_area: np.ndarray, image_area, accepted: np.ndarray | None = None):
    """Counts of the two trivial predictions, from true areas ``int[N, C]`` alone.

    ``image_area``: H*W per image (scalar or ``int[N]``). ``accepted``: ``bool[N, C]``, the
    classes the classifier accepts (all classes when None). Returns a dict name -> (inter,
    pred_area, true_area).
    """
    true_area = np.asarray(true_area, dtype=np.int64)
    image_area = np.broadcast_to(np.asarray(image_area, dtype=np.int64).reshape(-1, 1), true_area.shape)
    zeros = np.zeros_like(true_area)
    acc = np.ones_like(true_area, dtype=bool) if accepted is None else np.asarray(accepted, dtype=bool)
    return {
        "all-empty": (zeros, zeros, true_area),
        "whole image if accepted": (np.where(acc, true_area, 0), np.where(acc, image_area, 0), true_area),
    }


def dice_with_baselines(
    rows: dict[str, np.ndarray],
    true_area: np.ndarray,
    image_area,
    accepted: np.ndarray | None = None,
    defective_only: bool = True,
) -> dict[str, DiceScores]:
    """Score methods (name -> pair Dice ``float[N, C]``) and append the two baselines."""
    out = {name: score_dice(d, true_area, defective_only) for name, d in rows.items()}
    for name, counts in baseline_counts(true_area, image_area, accepted).items():
        out[f"baseline: {name}"] = score_dice(dice_from_counts(*counts), true_area, defective_only)
    return out


def _fmt(x: float) -> str:
    return "   -  " if not np.isfinite(x) else f"{x:.4f}"


def format_dice_table(scores: dict[str, DiceScores], class_names=None, title: str | None = None) -> str:
    """A plain-text table, one row per method: the three figures (positive-pair Dice, the Kaggle
    mean over all images, the Kaggle mean over defective images), the share of absent pairs that
    got a mask, then Kaggle / positive-pair Dice per class (defective images)."""
    first = next(iter(scores.values()))
    c = len(first.kaggle)
    names = list(class_names) if class_names is not None else [f"class {i + 1}" for i in range(c)]
    width = max(len("method"), *(len(k) for k in scores)) + 2
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"{'method':<{width}}| {'pos. pairs':>10} | {'Kaggle, all':>11} | {'Kaggle, def.':>12} | {'absent masked':>13} | "
        + " | ".join(f"{n:>15}" for n in names)
    )
    lines.append(f"{'':<{width}}| {'':>10} | {'':>11} | {'':>12} | {'':>13} | "
                 + " | ".join(f"{'kaggle / pos':>15}" for _ in names))
    lines.append("-" * len(lines[-1]))
    for name, s in scores.items():
        cells = " | ".join(f"{_fmt(s.kaggle[i]):>7}/{_fmt(s.positive[i]):>7}" for i in range(c))
        masked = "   -  " if not np.isfinite(s.absent_masked) else f"{100 * s.absent_masked:.1f}%"
        lines.append(f"{name:<{width}}| {_fmt(s.positive_mean):>10} | {_fmt(s.kaggle_all_mean):>11} | "
                     f"{_fmt(s.kaggle_mean):>12} | {masked:>13} | {cells}")
    lines.append(
        f"{first.n_images} defective images; positive pairs per class: " + ", ".join(str(int(n)) for n in first.n_positive)
        + "; 'Kaggle, all': every image (clean ones too, empty/empty = 1); 'absent masked': absent (image, class) "
        "pairs given a mask"
    )
    return "\n".join(lines)


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC-AUC per class: ``labels`` 0/1 ``[N, C]``, ``probs`` float ``[N, C]`` -> ``float[C]``.

    NaN for a class whose labels are all 0 or all 1 (AUC is undefined there).
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 2:
        raise ValueError(f"expected matching [N, C] arrays, got {labels.shape} and {probs.shape}")
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        y = labels[:, c]
        if 0 < y.sum() < len(y):
            out[c] = roc_auc_score(y, probs[:, c])
    return out


def format_auc_table(rows: dict[str, np.ndarray], class_names=None, title: str | None = None) -> str:
    """Paper's Table 1 layout: one row per model, ROC-AUC per class and the mean."""
    c = len(next(iter(rows.values())))
    names = list(class_names) if class_names is not None else [f"class {i + 1}" for i in range(c)]
    width = max(len(k) for k in rows) + 2
    lines = [title] if title else []
    lines.append(f"{'model':<{width}}| " + " | ".join(f"{n:>8}" for n in names) + " |     mean")
    lines.append("-" * len(lines[-1]))
    for name, auc in rows.items():
        mean = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
        lines.append(f"{name:<{width}}| " + " | ".join(f"{_fmt(a):>8}" for a in auc) + f" | {_fmt(mean):>8}")
    return "\n".join(lines)
