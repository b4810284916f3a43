"""Out-of-fold tuning and scoring of a classifier + segmenter composition
(:mod:`cam2seg.models.compose`): what an image without labels gets.

The segmenter's out-of-fold maps give the histograms (:mod:`cam2seg.evaluate.tuning`); the
classifier's out-of-fold probabilities replace the map maxima as the gate's scores. Both are
out of fold only when the segmenter was trained on the classifier's folds (``cam2seg
train-segmenter`` takes them from the model that made the pseudo-masks); other folds are refused.

The setting is chosen by :func:`cam2seg.evaluate.tuning.constrained_sweep`: per class the best
Kaggle mean over all images under a positive-pair floor and an absent-pair ceiling, so no class
is switched off. What it is tuned against:

* labels only (the default, at the end of ``cam2seg train-segmenter``): the pseudo-masks in the
  label store as the shapes (:func:`pseudo_truth`), the archive's image labels as presence, which
  they are exactly; no true mask is read;
* true masks (``cam2seg evaluate``): an upper bound for the same composition.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from .. import io, preprocess, store
from ..archive import Archive, ArchiveError
from ..artifact import ModelCard, load_card, update_card
from ..folds import FOLDS_FILE, load_folds
from ..models.compose import CARD_KEY, Composition, weights_digest
from ..models.predict import load_predictor
from . import tuning
from .cams import CamStats

__all__ = ["shared_folds", "oof_probs", "tune_composition",
           "write_composition", "pseudo_truth", "FLOOR", "CEILING", "METHOD"]

_log = logging.getLogger(__name__)

#: defaults of the constrained tuning (config section ``compose``)
FLOOR, CEILING = 0.8, 0.02
#: the tuning's name, recorded in the composition: a card chosen by another is tuned again
METHOD = "constrained_sweep: best Kaggle mean under the floor and ceiling, floor relaxed before the ceiling"


def shared_folds(classifier_url: str, segmenter_url: str, archive: Archive) -> dict[str, int]:
    """The folds both models were trained on, for ``archive``'s images; ArchiveError when they
    differ (a composed row would then not be out of fold)."""
    for url in (classifier_url, segmenter_url):
        if not io.exists(io.join(url, FOLDS_FILE)):
            raise ArchiveError(f"{url} has no {FOLDS_FILE}: a composition can only be scored out of fold when both "
                               "models were trained on the same folds")
    cls_folds = load_folds(io.join(classifier_url, FOLDS_FILE))
    seg_folds = load_folds(io.join(segmenter_url, FOLDS_FILE))
    differ = [i for i in archive.image_ids if cls_folds.get(i) != seg_folds.get(i)]
    if differ:
        raise ArchiveError(f"{segmenter_url} and {classifier_url} were trained on other folds ({len(differ)} of "
                           f"{len(archive)} images differ, e.g. {differ[0]}): a composition is scored out of fold "
                           "only when the segmenter is trained on the classifier's folds")
    return seg_folds


def oof_probs(classifier_url: str, archive: Archive, folds: dict[str, int], batch_size: int = 16,
              device=None) -> np.ndarray:
    """The classifier's out-of-fold probabilities ``float32[N, C]`` of every archive image (one
    forward of its fold model per image; the same values its CAM pass gives)."""
    predictor = load_predictor(classifier_url, device)
    card = predictor.card
    out = np.zeros((len(archive), card.num_classes), np.float32)
    t0 = time.perf_counter()
    for k in range(len(predictor.models)):
        idx = [i for i, iid in enumerate(archive.image_ids) if folds[iid] == k]
        for s in range(0, len(idx), batch_size):
            rows = idx[s : s + batch_size]
            imgs = preprocess.load_images([archive.image_url(archive.image_ids[i]) for i in rows],
                                          tuple(card.input_size), channels=card.channels)
            out[rows] = predictor.scores(imgs, fold=k).cpu().numpy()
    _log.info(f"  classifier {classifier_url}: out-of-fold probabilities of {len(archive)} images in "
              f"{time.perf_counter() - t0:.0f}s")
    return out


def tune_composition(st: CamStats, classifier_url: str, tuned_on: str, *, floor: float = FLOOR,
                     ceiling: float = CEILING) -> Composition:
    """The constrained per-class setting on ``st`` (a segmenter's out-of-fold statistics whose
    ``probs`` are the classifier's out-of-fold probabilities: :func:`oof_probs`) as a Composition."""
    res = tuning.constrained_sweep(st.h_all, st.h_in, st.true_area, st.probs, st.image_area,
                                   floor=floor, ceiling=ceiling)
    card = load_card(classifier_url)
    return Composition(**res.pp.model_dump(), classifier=classifier_url, classifier_version=weights_digest(card),
                       tuned_on=tuned_on, floor=floor, ceiling=ceiling, method=METHOD, scores=res.summary())


def write_composition(segmenter_url: str, comp: Composition) -> ModelCard:
    """Record ``comp`` in the segmenter's card (``metrics["composed"]``); returns the new card."""
    card = load_card(segmenter_url)
    card = update_card(segmenter_url, card, metrics={**card.metrics, CARD_KEY: comp.model_dump(mode="json")})
    _log.info(f"wrote the composition with {comp.classifier} (tuned on {comp.tuned_on}) into "
              f"{segmenter_url}/model.json (version now {card.version})")
    return card


def pseudo_truth(archive: Archive, store_url: str) -> Archive:
    """``archive`` cut to the images the store holds, with the store's newest masks as its
    masks and the archive's own image labels: what labels-only tuning scores against."""
    t = store.read_masks(store_url, columns=["image_id", "class_id", "encoded_pixels"],
                         image_ids=archive.image_ids).to_pydict()
    held = set(t["image_id"])
    ids = [i for i in archive.image_ids if i in held]
    if not ids:
        raise ArchiveError(f"{store_url} holds no mask of any image of {archive.source}")
    rles = {(i, int(c)): (e, 0) for i, c, e in zip(t["image_id"], t["class_id"], t["encoded_pixels"]) if e}
    labels = archive.labels[[archive.index(i) for i in ids]]
    return Archive(root=archive.root, source=f"pseudo-masks of {store_url}", image_ids=ids, labels=labels,
                   has_masks=True, num_classes=archive.num_classes, class_names=list(archive.class_names),
                   images_dir=archive.images_dir, _rles=rles, _index={i: k for k, i in enumerate(ids)})


def segmenter_stats(segmenter_url: str, archive: Archive, folds: dict[str, int], batch_size: int = 16,
                    device=None) -> CamStats:
    """The segmenter's out-of-fold map histograms over ``archive`` (scores: its map maxima)."""
    from .cams import oof_map_stats

    return oof_map_stats(archive, folds, load_predictor(segmenter_url, device), batch_size, f"segmenter {segmenter_url}")


def tune_labels_only(segmenter_url: str, classifier_url: str, archive: Archive, store_url: str, *,
                     floor: float = FLOOR, ceiling: float = CEILING, batch_size: int = 16,
                     device=None) -> Composition:
    """The composition tuned out of fold against the store's pseudo-masks and the archive's image
    labels (:func:`pseudo_truth`): no true mask is read."""
    truth = pseudo_truth(archive, store_url)
    folds = shared_folds(classifier_url, segmenter_url, truth)
    st = segmenter_stats(segmenter_url, truth, folds, batch_size, device)
    st = replace(st, probs=oof_probs(classifier_url, truth, folds, batch_size, device))
    return tune_composition(st, classifier_url, f"pseudo-masks of {store_url}", floor=floor, ceiling=ceiling)
