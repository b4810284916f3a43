"""Refining maps on the image before the threshold: a plain dict registry of steps.

Each step takes maps ``float[B, C, H, W]`` in [0, 1] and the images ``float[B, 1, H, W]`` (grey)
or ``float[B, 3, H, W]`` (RGB) they were computed from (same H, W), and returns refined maps of
the same shape in [0, 1];
every image is refined on its own pixels only, so batching never changes a mask.

* ``contrast`` (:mod:`cam2seg.refine.contrast`): keep the part of the map where the image
  stands out from its median background;
* ``par`` (:mod:`cam2seg.refine.par`): pixel-adaptive refinement, propagating the map over the
  image's local intensity affinities.

:class:`Refine` is the typed setting (steps in order, and each step's parameters) that configs,
model cards and run markers record. The default, contrast then PAR, was chosen on out-of-fold
maps of two synthetic archives (BENCHMARKS.md, "Refined pseudo-masks").
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .contrast import contrast
from .par import par

__all__ = ["REFINERS", "Refine", "ContrastSetting", "ParSetting", "refine_maps", "NO_REFINE", "DEFAULT_REFINE"]

REFINERS = {"contrast": contrast, "par": par}


class ContrastSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: float = Field(0.8, gt=0, le=4, description="median background window, as a fraction of the image height")
    z_low: float = Field(2.5, ge=0, description="deviation (robust sigmas) where the gate starts to open")
    z_high: float = Field(6.0, gt=0, description="deviation (robust sigmas) where it is fully open")
    cam_power: float = Field(0.5, gt=0, description="the map is raised to this power before the gate")


class ParSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dilations: list[int] = Field([1, 2, 4, 8], description="neighbour distances in pixels (8 directions each); "
                                 "small ones keep 1-2 px scratches")
    iterations: int = Field(10, ge=0, le=200, description="propagation steps")
    w_intensity: float = Field(0.3, gt=0, description="intensity affinity width, in neighbour standard deviations")
    w_position: float = Field(0.01, ge=0, description="weight of the pull towards near neighbours")

    @field_validator("dilations")
    @classmethod
    def _dilations(cls, v):
        if not v or any(d < 1 or d > 64 for d in v):
            raise ValueError("dilations must be 1 to 64 pixels, at least one")
        return v


class Refine(BaseModel):
    """How maps are refined on the image: ``steps`` in order (empty: not at all)."""

    model_config = ConfigDict(extra="forbid")

    steps: list[Literal[tuple(REFINERS)]] = Field(["contrast", "par"], description="refinement steps in order: "
                                                  "contrast, par; [] for none")
    contrast: ContrastSetting = ContrastSetting()
    par: ParSetting = ParSetting()

    @property
    def name(self) -> str:
        return " + ".join(self.steps) or "none"


NO_REFINE = Refine(steps=[])
#: What a new classifier card refines with: a labels-only user's default (measured in BENCHMARKS.md).
DEFAULT_REFINE = Refine()


def refine_maps(maps: torch.Tensor, images: torch.Tensor, refine: Refine | None,
                cache: dict | None = None) -> torch.Tensor:
    """``maps`` refined as ``refine`` says (None or no steps: returned unchanged). ``cache``: a
    dict that lives as long as these ``images``; refining them several ways (evaluate's rows)
    then computes each step's image terms (PAR's affinities, the contrast gate) once."""
    if refine is None:
        return maps
    for step in refine.steps:
        maps = REFINERS[step](maps, images, **getattr(refine, step).model_dump(), cache=cache)
    return maps
