"""Any saved artifact as one predictor: maps and masks for images, with the card's post-processing.

``load_predictor(url)`` reads a classifier artifact (maps = CAMs of the fold ensemble, scores
= class probabilities) or a segmenter artifact (maps = mean sigmoid of the fold ensemble,
scores = each map's maximum) and returns a :class:`Predictor` with one contract for both:

* ``maps(images, out_size=None, fold=None)`` -> (maps ``float32[B, C, H, W]`` in [0, 1],
  scores ``float32[B, C]``), torch tensors on the predictor's device;
* ``masks(images, shapes)`` -> (masks, one ``bool[C, H_i, W_i]`` per image at its original size,
  scores ``float32[B, C]`` numpy), after the card's post-processing.

``images`` are ``uint8[B, h, w]`` (grey) or ``uint8[B, h, w, 3]`` (RGB); they are converted to the
channels the card's model reads and, when not at its ``input_size``, resized
(:func:`cam2seg.preprocess.prepare`). ``fold=k`` uses fold model ``k`` alone (out-of-fold
scoring); the default is the mean of all folds. The device is chosen once, by
:func:`pick_device`, for the label job, evaluation and the report alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import preprocess
from ..artifact import ModelCard, load_card
from ..cam import DEFAULT_METHOD, compute_cams
from ..postprocess import PostProcess, apply
from ..refine import Refine, refine_maps
from .classifier import load_fold_models
from .segmenter import load_segmenters, predict_maps

__all__ = ["Predictor", "load_predictor", "pick_device", "masks_at"]


def pick_device(device=None) -> torch.device:
    """``device`` if given, else the first CUDA device when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class Predictor:
    """Fold models of one artifact on one device, with the post-processing its masks use.

    ``method``, ``aug_smooth`` and ``fuse_strides`` pick the CAM variant (classifiers only; see
    :func:`cam2seg.cam.compute_cams`); ``refine`` how maps
    are refined on the image at the input size before they are resized and thresholded (None:
    not at all).
    """

    card: ModelCard
    models: list
    device: torch.device
    postprocess: PostProcess
    method: str = DEFAULT_METHOD
    aug_smooth: bool = True
    refine: Refine | None = None
    fuse_strides: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return self.card.kind

    @property
    def class_ids(self) -> list[int]:
        return list(self.card.class_ids)

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """``uint8[B, h, w(, 3)]`` -> the normalised model input ``float32[B, in_chans, *input_size]``."""
        size, channels = tuple(self.card.input_size), self.card.channels
        images = np.asarray(images)
        preprocess.channels_of(images)  # a clear error for anything but [B, h, w] or [B, h, w, 3]
        want = size + ((3,) if channels == 3 else ())
        if tuple(images.shape[1:]) != want:
            images = np.stack([preprocess.prepare(im, size, channels) for im in images]) if len(images) else \
                np.zeros((0, *want), np.uint8)
        return preprocess.to_input(images, self.card.mean, self.card.std, device=self.device)

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """``uint8[B, h, w(, 3)]`` -> what refinement sees: ``float32[B, channels, *input_size]`` in [0, 1]
        (1 channel for a grey model, the RGB image for a colour one)."""
        return self._pixels(self.inputs(images))

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        # the model input, un-normalised; a grey image replicated to 3 channels (old cards) is one channel
        c = self.card.channels
        m = torch.tensor(self.card.mean[:c], device=x.device, dtype=x.dtype).view(1, c, 1, 1)
        s = torch.tensor(self.card.std[:c], device=x.device, dtype=x.dtype).view(1, c, 1, 1)
        return x[:, :c] * s + m

    def maps(self, images: np.ndarray, out_size: tuple[int, int] | None = None,
             fold: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps in [0, 1] at ``out_size`` or the input size, scores); see the module doc."""
        models = self.models if fold is None else self.models[fold]
        x = self.inputs(images)
        if self.kind == "segmenter":
            maps, scores = predict_maps(models, x, None)
        else:
            maps, scores = compute_cams(models, x, self.method, self.aug_smooth, fuse_strides=self.fuse_strides)
        if self.refine is not None and self.refine.steps:
            maps = refine_maps(maps, self._pixels(x), self.refine)
        if out_size is not None and tuple(out_size) != tuple(maps.shape[-2:]):
            maps = F.interpolate(maps, size=tuple(out_size), mode="bilinear", align_corners=False)
        return maps, scores

    @torch.no_grad()
    def scores(self, images: np.ndarray, fold: int | None = None) -> torch.Tensor:
        """Class scores ``float32[B, C]`` alone, without maps: a classifier ensemble's mean
        probability (one forward, the same values :meth:`maps` returns), a segmenter's map maximum."""
        models = self.models if fold is None else [self.models[fold]]
        x = self.inputs(images)
        if self.kind == "segmenter":
            return predict_maps(models, x, None)[1]
        return torch.stack([torch.sigmoid(m(x).float()) for m in models]).mean(0)

    def masks(self, images: np.ndarray, shapes, fold: int | None = None,
              postprocess: PostProcess | None = None,
              gate: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """Masks of each image at its original ``(H, W)`` in ``shapes``, and the scores.

        Maps are resized to each image's own size before the threshold, so masks keep the
        resolution the image had; ``postprocess`` overrides the card's setting; ``gate``
        ``int[B, C]`` (1 present, 0 absent, -1 unknown) replaces the confidence test where known
        (:func:`cam2seg.postprocess.apply`). Scores stay the model's.
        """
        maps, scores = self.maps(images, fold=fold)
        return masks_at(maps, scores, shapes, postprocess or self.postprocess, gate)


def masks_at(maps: torch.Tensor, scores: torch.Tensor, shapes, pp: PostProcess,
             gate: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """``maps float[B, C, h, w]`` and ``scores float[B, C]`` -> (one ``bool[C, H_i, W_i]`` per image
    at its ``shapes[i]``, scores as numpy): each map resized to its image's size, then
    :func:`cam2seg.postprocess.apply` with ``pp`` and ``gate``."""
    scores_np = scores.float().cpu().numpy()
    out = []
    for i, (h, w) in enumerate(shapes):
        m = maps[i : i + 1]
        if tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        g = None if gate is None else np.asarray(gate)[i : i + 1]
        out.append(apply(m.float().cpu().numpy(), scores_np[i : i + 1], pp, g)[0])
    return out, scores_np


def load_predictor(url: str, device=None, *, weights: str = "swa", method: str | None = None,
                   aug_smooth: bool | None = None, refine: Refine | None = None,
                   fuse_strides: Sequence[int] | None = None) -> Predictor:
    """The :class:`Predictor` of the artifact at ``url`` (a classifier or a segmenter).

    ``weights``: "swa" (the artifact's weights) or "best-epoch" (classifiers: each fold's best
    single epoch, for ablations). ``method`` / ``aug_smooth`` / ``fuse_strides`` / ``refine``: the
    CAM variant and its refinement; by default what the card's post-processing was tuned for,
    else GradCAM++ with aug smoothing on the final features, unrefined
    (``cam2seg.refine.NO_REFINE`` asks for no refinement). Fused stages
    (``fuse_strides``, see :func:`cam2seg.cam.compute_cams`) are for measurements only
    (``bench/fused_cams.py``): they did not help refined masks, so cards do not record them.
    """
    dev = pick_device(device)
    if load_card(url).kind == "segmenter":
        card, models = load_segmenters(url, dev)
    else:
        card, models = load_fold_models(url, dev, weights=weights)
    post = card.postprocess
    return Predictor(card, models, dev, post.setting(),
                     method=method or post.method or DEFAULT_METHOD,
                     aug_smooth=post.aug_smooth if aug_smooth is None and post.aug_smooth is not None
                     else (True if aug_smooth is None else aug_smooth),
                     refine=refine if refine is not None else post.refine,
                     fuse_strides=tuple(fuse_strides or ()))
