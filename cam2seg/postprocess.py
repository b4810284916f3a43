"""The paper's post-processing of maps into masks: ``confidence`` gate on the class score,
pixel ``threshold`` on the map, ``min_seg_len`` minimum mask area; each global or per class.

The paper's defaults live here and nowhere else: :data:`PAPER` for CAM masks (confidence 0.5,
threshold 0.3), :data:`PAPER_SEGMENTER` for the U-Net (threshold 0.2, no gate).
"""

from __future__ import annotations

import numpy as np
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["PostProcess", "CardPostProcess", "apply", "PAPER", "PAPER_SEGMENTER", "paper_default"]


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
    ``aug_smooth``: the CAM variant the setting was tuned for (classifiers only).
    """

    model_config = ConfigDict(extra="forbid")

    tuned: bool = False
    objective: Literal["kaggle", "positive"] | None = None
    global_setting: PostProcess | None = None
    method: str | None = None
    aug_smooth: bool | None = None

    def setting(self) -> PostProcess:
        """The masks' setting alone (what :func:`apply` needs)."""
        return PostProcess(confidence=self.confidence, threshold=self.threshold, min_seg_len=self.min_seg_len)


PAPER = PostProcess(confidence=0.5, threshold=0.3, min_seg_len=0)
PAPER_SEGMENTER = PostProcess(confidence=0.0, threshold=0.2, min_seg_len=0)


def paper_default(kind: str) -> CardPostProcess:
    """The untuned card setting of a new ``kind`` ("classifier" or "segmenter") artifact."""
    base = PAPER if kind == "classifier" else PAPER_SEGMENTER
    return CardPostProcess(**base.model_dump())


def apply(cams: np.ndarray, probs: np.ndarray, pp: PostProcess) -> np.ndarray:
    """``cams float[B, C, H, W]`` in [0, 1], ``probs float[B, C]`` -> masks ``bool[B, C, H, W]``.

    A class is kept when its probability >= confidence; then pixels >= threshold; a mask
    with fewer than min_seg_len pixels is dropped.
    """
    cams = np.asarray(cams)
    b, c = cams.shape[:2]
    conf, thr, min_len = pp.arrays(c)
    masks = cams >= thr[None, :, None, None]
    masks &= (np.asarray(probs) >= conf[None, :])[:, :, None, None]
    area = masks.sum(axis=(-2, -1))
    masks &= (area >= min_len[None, :])[:, :, None, None]
    return masks
