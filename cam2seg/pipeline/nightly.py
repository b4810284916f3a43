"""The nightly run: label the images that arrived since the last run, with the current model;
optionally retrain the segmenter once enough new labels have piled up (off by default).

"New" means no committed run of the store has labeled the image, with any model version: a
night's cost follows the images that arrived, not the archive's size, and a new model version
does not silently relabel millions of images (``cam2seg label --incremental`` does that, on
purpose). "The current model" is whatever artifact ``nightly.model`` holds when the run starts.
A crashed or killed run leaves its committed parts; the next run (or a re-submission) labels
only what is still missing. Retraining is decided from the store's commit markers and the
segmenter's card (:func:`new_labels`), so it needs no state of its own either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import io, store
from ..artifact import CARD_FILE, load_card
from ..config import Config

__all__ = ["RetrainDecision", "new_labels", "retrain_decision", "run_nightly", "NightlySummary"]

_log = logging.getLogger(__name__)


def new_labels(runs: list[store.RunMarker], trained_on: list[str]) -> int:
    """Images labeled by the committed ``runs`` (store markers) that are not among the run ids
    ``trained_on`` (a segmenter card's ``training.store_runs``). Relabels count again: they
    are new masks too."""
    seen = set(trained_on)
    return sum(r.labeled for r in runs if r.run_id not in seen)


@dataclass(frozen=True)
class RetrainDecision:
    due: bool
    new: int
    threshold: int
    reason: str


def retrain_decision(store_url: str, segmenter_url: str | None, threshold: int,
                     true_masks: str | None = None) -> RetrainDecision:
    """Whether the segmenter at ``segmenter_url`` should be retrained on the store now:
    ``threshold`` > 0 and at least that many images labeled since it was trained on this store
    (all of the store's labels when it does not exist yet or was trained on other masks), or the
    corrections file ``true_masks`` differs from the one it was trained with."""
    if threshold <= 0:
        return RetrainDecision(False, 0, threshold, "retraining is off (nightly.retrain_after: 0)")
    from ..artifact import ArtifactError

    runs = store.committed_runs(store_url)
    trained_on: list[str] = []
    try:
        card = load_card(segmenter_url)
    except ArtifactError:
        card = None
    if card is None:
        why = f"no segmenter at {segmenter_url} yet"
    elif card.training.masks == store_url:
        trained_on = list(card.training.store_runs or [])
        why = f"segmenter version {card.version} was trained on {len(trained_on)} run(s) of this store"
    else:
        why = f"segmenter version {card.version} was trained on other masks ({card.training.masks})"
    n = new_labels(runs, trained_on)
    due = n >= threshold
    if card is not None and true_masks:
        from ..train.masks import file_digest

        had = (card.training.supervision or {}).get("true_masks_sha256")
        if had != file_digest(true_masks):
            due = True
            why += "; the corrections file " + ("changed since" if had else "was not used by it")
    verdict = "retraining" if due else "not retraining yet"
    return RetrainDecision(due, n, threshold, f"{why}; {n} images labeled since, threshold {threshold}: {verdict}")


class NightlySummary(dict):
    """What a nightly run did; ``str()`` is what the job prints last."""

    def __str__(self) -> str:
        lines = [f"nightly run finished in {self['seconds']:.0f}s",
                 f"  labels: {self['store']} (run {self['label']['run_id']}: {self['label']['labeled']} new images "
                 f"labeled, {self['label']['errors']} errors, {self['label']['skipped']} already labeled)",
                 f"  retrain: {self['retrain']}"]
        if self.get("segmenter"):
            lines.append(f"  segmenter: {self['segmenter']} (version {self['segmenter_version']})")
        return "\n".join(lines)


def _check(cfg: Config) -> None:
    n = cfg.nightly
    missing = [k for k in ("model", "images", "store") if not getattr(n, k)]
    if missing:
        raise ValueError(f"nightly needs {', '.join(missing)} (flags --model/--images/--out or the config's "
                         f"nightly section)")
    if n.retrain_after:
        if not (n.data and n.segmenter):
            raise ValueError("nightly.retrain_after needs nightly.data (the image-level labels) and "
                             "nightly.segmenter (where the segmenter goes)")
        if io.absolute(n.segmenter) == io.absolute(n.model):
            raise ValueError(f"nightly.model is the segmenter being retrained ({n.segmenter}): it would learn "
                             f"from its own masks. Label with the classifier and retrain from that store.")
        from ..archive import Archive

        archive = Archive.open(n.data, check_images=False)
        images = archive.images_url
        if images.rstrip("/") != io.absolute(n.images).rstrip("/"):
            raise ValueError(f"nightly.data's images are {images}, but the nightly labels {io.absolute(n.images)}: "
                             f"the store's image ids would not match the labels")
        if n.true_masks:
            from ..truemasks import read_true_masks

            read_true_masks(n.true_masks, archive)  # a bad corrections file fails before hours of labeling
    elif n.true_masks:
        raise ValueError("nightly.true_masks is used when the segmenter is retrained: set nightly.retrain_after too")


def _composes(n, seg_url: str | None) -> bool:
    """Whether tonight's images are labeled by the classifier and the segmenter together."""
    if not (n.compose and seg_url and io.exists(io.join(seg_url, CARD_FILE))):
        return False
    return load_card(n.model).kind == "classifier" and load_card(seg_url).kind == "segmenter"


def run_nightly(cfg: Config) -> NightlySummary:
    """One nightly run with ``cfg.nightly`` (paths, policy), ``cfg.label`` (the labeling job)
    and ``cfg.segmenter`` (a retraining). Safe to re-run: each step resumes or skips."""
    from .label import label_archive

    _check(cfg)
    n = cfg.nightly
    store_url = io.absolute(n.store)
    t0 = time.perf_counter()
    seg_url = io.absolute(n.segmenter) if n.segmenter else None
    label = label_archive(n.model, n.images, store_url, cfg.label, new_only=True,
                          segmenter=seg_url if _composes(n, seg_url) else None)
    _log.info(str(label))
    summary = NightlySummary(store=store_url, label=dict(label), segmenter=None, segmenter_version=None)
    decision = retrain_decision(store_url, seg_url, n.retrain_after, n.true_masks)
    _log.info(f"retrain policy: {decision.reason}")
    summary["retrain"] = decision.reason
    if decision.due:
        from .segment import train_segmenter

        card = train_segmenter(n.data, store_url, seg_url, cfg.segmenter, true_masks=n.true_masks, compose=cfg.compose)
        summary.update(segmenter=seg_url, segmenter_version=card.version)
    summary["seconds"] = time.perf_counter() - t0
    return summary
