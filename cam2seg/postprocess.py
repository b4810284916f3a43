"""The paper's post-processing of maps into masks: ``confidence`` gate on the class score,
pixel ``threshold`` on the map, ``min_seg_len`` minimum mask area; each global or per class.

The paper's settings live here and nowhere else: :data:`PAPER` for CAM masks (confidence 0.5,
threshold 0.3), :data:`PAPER_SEGMENTER` for the U-Net (threshold 0.2, no gate); and cam2seg's
own untuned default for refined CAM masks, :data:`DEFAULT_CAM`.
"""

from __future__ import annotations

import numpy as np
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from .refine import DEFAULT_REFINE, Refine

__all__ = ["PostProcess", "CardPostProcess", "apply", "PAPER", "PAPER_SEGMENTER", "DEFAULT_CAM", "card_default"]


def _per_class(v, n: int, name: str) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        return np.full(n, arr[0])
    if arr.size != n:
        raise ValueError(f"{name}: {arr.size} values for {n} classes")
    return arr


class PostProcess(BaseModel):
    """Scalars apply to every class; lists give one value per class (ClassId order)."""

    model_config = ConfigDict(extra="ignore")

    confidence: float | list[float] = 0.5
    threshold: float | list[float] = 0.3
    min_seg_len: int | list[int] = 0

    @field_validator("confidence", "threshold")
    @classmethod
    def _unit(cls, v):
        vals = v if isinstance(v, list) else [v]
        if any(not 0.0 <= x <= 1.0 for x in vals):
            raise ValueError("must lie in [0, 1]")
        return v

    def arrays(self, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (_per_class(self.confidence, num_classes, "confidence"),
                _per_class(self.threshold, num_classes, "threshold"),
                _per_class(self.min_seg_len, num_classes, "min_seg_len"))


class CardPostProcess(PostProcess):
    """What a model card records: the setting its masks use, and how it was chosen.

    ``tuned``: set by ``cam2seg evaluate`` on out-of-fold maps for ``objective``; ``global_setting``:
    the best single setting for all classes beside the per-class one above; ``method`` and
    ``aug_smooth``: the CAM variant the setting was tuned for (classifiers only); ``refine``: how
    maps are refined on the image before the threshold (None: not at all; cards from before
    refinement existed).
    """

    model_config = ConfigDict(extra="forbid")

    tuned: bool = False
    objective: Literal["kaggle", "paper", "positive"] | None = None
    global_setting: PostProcess | None = None
    method: str | None = None
    aug_smooth: bool | None = None
    refine: Refine | None = None

    def setting(self) -> PostProcess:
        """The masks' setting alone (what :func:`apply` needs)."""
        return PostProcess(confidence=self.confidence, threshold=self.threshold, min_seg_len=self.min_seg_len)


PAPER = PostProcess(confidence=0.5, threshold=0.3, min_seg_len=0)
PAPER_SEGMENTER = PostProcess(confidence=0.0, threshold=0.2, min_seg_len=0)
#: The setting of refined CAM masks that no true mask tuned: what a labels-only user gets.
#: Chosen on out-of-fold maps of two synthetic archives of different seeds (BENCHMARKS.md).
DEFAULT_CAM = PostProcess(confidence=0.5, threshold=0.1, min_seg_len=0)


def card_default(kind: str) -> CardPostProcess:
    """The untuned setting of a new ``kind`` ("classifier" or "segmenter") artifact: refined CAMs
    at :data:`DEFAULT_CAM` for classifiers, the paper's heuristics for segmenters."""
    if kind == "classifier":
        return CardPostProcess(**DEFAULT_CAM.model_dump(), refine=DEFAULT_REFINE)
    return CardPostProcess(**PAPER_SEGMENTER.model_dump())


def apply(cams: np.ndarray, probs: np.ndarray, pp: PostProcess, gate: np.ndarray | None = None) -> np.ndarray:
    """``cams float[B, C, H, W]`` in [0, 1], ``probs float[B, C]`` -> masks ``bool[B, C, H, W]``.

    A class is kept when its probability >= confidence; then pixels >= threshold; a mask
    with fewer than min_seg_len pixels is dropped. ``gate`` ``int[B, C]`` overrides the
    confidence test where it is not -1: 1 keeps the class (the image-level label names it), 0
    drops it (the label says it is absent).
    """
    cams = np.asarray(cams)
    b, c = cams.shape[:2]
    conf, thr, min_len = pp.arrays(c)
    masks = cams >= thr[None, :, None, None]
    keep = np.asarray(probs) >= conf[None, :]
    if gate is not None:
        gate = np.asarray(gate)
        if gate.shape != keep.shape:
            raise ValueError(f"gate must be [B, C] = {keep.shape}, got {gate.shape}")
        keep = np.where(gate >= 0, gate == 1, keep)
    masks &= keep[:, :, None, None]
    area = masks.sum(axis=(-2, -1))
    masks &= (area >= min_len[None, :])[:, :, None, None]
    return masks
