"""A classifier and a segmenter as one predictor for images without labels: the classifier
ensemble says whether a class is present, the segmenter ensemble draws its shape (the pairing
Severstal's Kaggle leaders used).

:class:`ComposedPredictor` keeps :class:`~cam2seg.models.predict.Predictor`'s contract
(``card``, ``class_ids``, ``models``, ``device``, ``refine``, ``maps``, ``pixels``, ``masks``),
so the label job and the out-of-fold scoring of :mod:`cam2seg.evaluate.cams` take it unchanged:

* maps: the segmenter ensemble's mean sigmoid ``float32[B, C, h, w]`` at its input size;
* scores: the classifier ensemble's probabilities ``float32[B, C]`` (one forward, no CAM);
* masks: :func:`cam2seg.postprocess.apply` with the :class:`Composition`'s setting: ``confidence``
  gates the classifier's probability, ``threshold`` and ``min_seg_len`` act on the segmenter's map.

The setting lives in the segmenter's card (``metrics["composed"]``), tuned out of fold by
:mod:`cam2seg.evaluate.composed` for the classifier version it names; with another classifier
version, or none recorded, :data:`DEFAULT_COMPOSITION` applies (and the label job says so).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..artifact import ModelCard
from ..classes import check_same
from ..postprocess import PostProcess
from .predict import Predictor, load_predictor, masks_at, pick_device

__all__ = ["Composition", "ComposedPredictor", "DEFAULT_COMPOSITION", "composition_for", "load_composed", "CARD_KEY",
           "weights_digest"]

_log = logging.getLogger(__name__)

#: where a segmenter card keeps its composition (under ``metrics``)
CARD_KEY = "composed"


class Composition(BaseModel):
    """How a classifier and a segmenter make one mask: the setting (scalars or one value per
    class), the classifier version it was tuned with, and what it was tuned on."""

    model_config = ConfigDict(extra="forbid")

    confidence: float | list[float] = Field(0.5, description="gate on the classifier's probability")
    threshold: float | list[float] = Field(0.5, description="pixel threshold on the segmenter's map")
    min_seg_len: int | list[int] = 0
    classifier: str | None = None
    #: the classifier's weights it was tuned with (:func:`weights_digest`)
    classifier_version: str | None = None
    #: None: the untuned default; else e.g. "pseudo-masks of <store>" or "true masks of <archive>"
    tuned_on: str | None = None
    floor: float | None = None
    ceiling: float | None = None
    #: the tuning that chose it (:data:`cam2seg.evaluate.composed.METHOD`); a card tuned by an older one is retuned
    method: str | None = None
    #: per class, at the setting, on the data it was tuned on (kaggle, positive, absent_masked, met, floor)
    scores: dict = {}

    def setting(self) -> PostProcess:
        return PostProcess(confidence=self.confidence, threshold=self.threshold, min_seg_len=self.min_seg_len)


#: What an untuned composition uses: the classifier's probability gate at 0.5 and the segmenter's
#: map at 0.5 (a sigmoid's midpoint; the gate, not the threshold, keeps clean images clean).
DEFAULT_COMPOSITION = Composition()


def composition_for(segmenter: ModelCard, classifier: ModelCard) -> tuple[Composition, str]:
    """(the composition the segmenter's card holds for this classifier version, or the default;
    a line saying which and why)."""
    check_same(segmenter.names, "the segmenter", classifier.names, "the classifier")
    rec = segmenter.metrics.get(CARD_KEY)
    if not rec:
        return DEFAULT_COMPOSITION, "the segmenter's card holds no tuned composition: default setting"
    comp = Composition(**rec)
    if comp.classifier_version != weights_digest(classifier):
        return DEFAULT_COMPOSITION, (f"the segmenter's composition was tuned with other classifier weights "
                                     f"({comp.classifier}): default setting")
    return comp, f"composition tuned on {comp.tuned_on}"


def weights_digest(card: ModelCard) -> str:
    """What identifies a model's weights: its files' hashes (a card's version also changes when
    only its post-processing is re-tuned)."""
    return hashlib.sha256(repr(sorted(card.files.items())).encode()).hexdigest()[:16]


@dataclass
class ComposedPredictor:
    """``presence`` (a classifier Predictor) gates, ``shape`` (a segmenter Predictor) draws."""

    presence: Predictor
    shape: Predictor
    composition: Composition
    refine: None = None  # maps are the segmenter's own; nothing refines them

    def __post_init__(self):
        if self.presence.kind != "classifier" or self.shape.kind != "segmenter":
            raise ValueError(f"a composition takes a classifier and a segmenter, got a {self.presence.kind} and a "
                             f"{self.shape.kind}")
        check_same(self.shape.card.names, "the segmenter", self.presence.card.names, "the classifier")
        if self.presence.card.folds != self.shape.card.folds:
            _log.info(f"the classifier has {self.presence.card.folds} folds and the segmenter "
                      f"{self.shape.card.folds}: out-of-fold scoring needs the same folds")
        self.postprocess = self.composition.setting()

    kind = "composed"

    @property
    def card(self) -> ModelCard:
        """The classifier's card: class list, channels and the labels' image size."""
        return self.presence.card

    @property
    def class_ids(self) -> list[int]:
        return self.presence.class_ids

    @property
    def models(self) -> list:
        return self.shape.models

    @property
    def device(self) -> torch.device:
        return self.shape.device

    @property
    def version(self) -> str:
        """What store rows carry: both models' versions."""
        return f"{self.presence.card.version}+{self.shape.card.version}"

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        return self.shape.pixels(images)

    def maps(self, images: np.ndarray, out_size: tuple[int, int] | None = None,
             fold: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the segmenter's maps, the classifier's probabilities); ``fold=k``: fold model k of each."""
        maps, _ = self.shape.maps(images, out_size, fold)
        return maps, self.presence.scores(images, fold).to(maps.device)

    def masks(self, images: np.ndarray, shapes, fold: int | None = None, postprocess: PostProcess | None = None,
              gate: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """As :meth:`cam2seg.models.predict.Predictor.masks`; a class whose probability is under
        its confidence stays empty whatever the segmenter draws (unless ``gate`` names it)."""
        maps, scores = self.maps(images, fold=fold)
        return masks_at(maps, scores, shapes, postprocess or self.postprocess, gate)


def load_composed(classifier_url: str, segmenter_url: str, device=None, *,
                  composition: Composition | None = None) -> tuple[ComposedPredictor, str]:
    """(the composed predictor of two artifacts on one device, the line saying which setting
    it uses: ``composition`` if given, else :func:`composition_for`)."""
    dev = pick_device(device)
    presence, shape = load_predictor(classifier_url, dev), load_predictor(segmenter_url, dev)
    if composition is None:
        composition, why = composition_for(shape.card, presence.card)
    else:
        why = "composition given"
    return ComposedPredictor(presence, shape, composition), why
