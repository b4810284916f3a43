"""Out-of-fold evaluation of segmenters and stored pseudo-masks: the paper's Table 3.

Rows, all on the archive's defective images, each beside the two trivial baselines:

* the pseudo-masks in a label store, as stored (what a segmenter trained on them saw);
* the classifier's tuned out-of-fold CAM masks (Table 2's best row), read from its card;
* per segmenter: its out-of-fold probability maps (each image by the fold model that did not
  train on it) with the paper's inference heuristics (threshold 0.2, no minimum area, no
  gate) and with post-processing tuned on these maps per class (gate: the map's maximum).

Tuning reuses :mod:`cam2seg.evaluate.tuning`'s histograms, so every setting is scored exactly without
recomputing a map. :func:`score_segmenters` only computes; :func:`write_segmenter_scores` records
a segmenter's tuned setting and rows in its card; :func:`evaluate_segmenters` is the two in a row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from .. import io, metrics, rle, store
from . import tuning
from .cams import TUNED_ROW, CamStats, oof_map_stats, pair_dice
from .composed import CEILING, FLOOR, oof_probs, shared_folds
from .rows import Table, card_row_scores, card_rows, scored_rows
from ..archive import Archive, ArchiveError
from ..artifact import ArtifactError, ModelCard, load_card, update_card
from ..folds import FOLDS_FILE, load_folds
from ..models.compose import composition_for
from ..models.predict import load_predictor
from ..postprocess import PAPER_SEGMENTER, CardPostProcess

__all__ = ["oof_seg_stats", "store_pair_dice", "store_row", "score_segmenters", "write_segmenter_scores", "evaluate_segmenters",
           "tuned_cam_row", "SegmenterScores", "STORE_ROW", "CARD_CAM_ROW"]

_log = logging.getLogger(__name__)

STORE_ROW = "store/as-stored"
CARD_CAM_ROW = "classifier-card/" + TUNED_ROW


def oof_seg_stats(seg_url: str, archive: Archive, batch_size: int = 8, device=None) -> CamStats:
    """Out-of-fold probability-map histograms of a segmenter artifact over ``archive``."""
    predictor = load_predictor(seg_url, device)
    folds = load_folds(io.join(seg_url, FOLDS_FILE))
    return oof_map_stats(archive, folds, predictor, batch_size, f"segmenter {seg_url}")


def store_pair_dice(store_url: str, archive: Archive, true_area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Dice ``float[N, C]`` of the store's masks against the true masks (areas ``true_area``
    ``int[N, C]``) for every archive image, ``held bool[N]``: the images the store has rows of).
    Dice of images the store lacks is that of empty masks: score ``held`` images only
    (:func:`store_row`)."""
    # the archive's images only: the store may hold millions more (pseudo-labeled, no truth)
    table = store.read_masks(store_url, columns=["image_id", "class_id", "encoded_pixels", "height", "width"],
                             image_ids=archive.image_ids)
    t = table.to_pydict()
    pred = {(i, c): (e, h, w) for i, c, e, h, w in zip(t["image_id"], t["class_id"], t["encoded_pixels"],
                                                         t["height"], t["width"])}
    n, c = len(archive), archive.num_classes
    inter, p_area = np.zeros((n, c), np.int64), np.zeros((n, c), np.int64)
    for i, iid in enumerate(archive.image_ids):
        for k, cid in enumerate(archive.class_ids):
            enc, h, w = pred.get((iid, cid), ("", 0, 0))
            if not enc:
                continue
            p = rle.decode(enc, h, w)
            truth = rle.decode(archive.rle(iid, cid), h, w) if true_area[i, k] else np.zeros((h, w), bool)
            inter[i, k], p_area[i, k] = int((p & truth).sum()), int(p.sum())
    held = np.array([(iid, archive.class_ids[0]) in pred for iid in archive.image_ids])
    if not held.any():
        raise ArchiveError(f"{store_url} holds no mask of any image of {archive.source}")
    return metrics.dice_from_counts(inter, p_area, true_area), held


def store_row(store_url: str, archive: Archive, true_area: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(pair Dice, held, label) of the store's row; a store that lacks some archive images is
    scored on the images it holds only, says so in its label and logs a warning (counting the
    missing ones as empty masks would make the row look like the all-empty baseline)."""
    dice, held = store_pair_dice(store_url, archive, true_area)
    label = f"CAM pseudo-masks as stored ({store_url})"
    if not held.all():
        _log.warning(f"warning: {store_url} holds masks of {int(held.sum())} of the archive's {len(held)} images; "
                     f"its row scores those {int(held.sum())} only ({int((~held).sum())} missing)")
        label += f", {int(held.sum())} of {len(held)} images"
    return dice, held, label


def tuned_cam_row(card) -> dict | None:
    """Table 2's tuned per-class row as a classifier card recorded it (``label``, kaggle/positive
    scores as plain lists), or None before ``cam2seg evaluate`` wrote it."""
    return card.metrics.get("cam_oof", {}).get(TUNED_ROW)


def _card_cam_row(model_url: str) -> tuple[str, str, metrics.DiceScores] | None:
    """(id, label, scores) of :func:`tuned_cam_row` of the classifier at ``model_url``, if evaluated."""
    try:
        card = load_card(model_url)
    except Exception:  # noqa: BLE001 - an unreadable card just leaves the row out
        return None
    r = tuned_cam_row(card)
    if r is None:
        return None
    return CARD_CAM_ROW, f"CAM masks OOF, tuned per class (from {model_url}'s card)", card_row_scores(r)


def _seg_name(card, url: str) -> str:
    """A row name that says what the segmenter learned from; prefixed by the artifact's folder
    name, so two segmenters with the same recipe stay two rows."""
    return f"{url.rstrip('/').rsplit('/', 1)[-1]}: {_recipe(card)}"


def _recipe(card) -> str:
    masks = card.training.masks or "?"
    if masks == "truth":
        return f"U-Net ({card.architecture}) on true masks"
    ref = card.training.refinements or {}
    parts = [k for k in ("absent_zero",) if ref.get(k)]
    if ref.get("ignore_band"):
        parts.append(f"band {ref['ignore_band']}")
    if ref.get("present_empty") == "ignore":
        parts.append("present-empty ignored")
    return f"U-Net ({card.architecture}) on pseudo-masks{' (' + ', '.join(parts) + ')' if parts else ''}"


@dataclass
class SegmenterScores:
    """What :func:`score_segmenters` found: the rows (id -> Dice) and the printed table, and per
    segmenter URL its tuned setting, its own row ids and its sweep curves."""

    rows: Table
    table: str
    objective: str
    tuned: dict[str, tuning.Tuned] = field(default_factory=dict)
    row_ids: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, CamStats] = field(default_factory=dict, repr=False)
    pairs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # row id -> pair Dice float[N, C]


def score_segmenters(truth_url: str, segmenters: list[str], store_url: str | None = None, *,
                     objective: str = "kaggle", batch_size: int = 8, device=None, classifier: str | None = None,
                     floor: float = FLOOR, ceiling: float = CEILING) -> SegmenterScores:
    """Table 3 for the archive at hand (``truth_url``, or an Archive such as
    :func:`cam2seg.truemasks.covered_archive`'s; nothing written).

    With a classifier (``classifier``, else the one that made the store's newest run) trained on
    a segmenter's folds, each such segmenter also gets the composed rows (:mod:`cam2seg.models.compose`):
    at its card's setting (what an image without labels gets; tuned on pseudo-masks, or the
    default) and tuned on these true masks under ``floor`` / ``ceiling``
    (:func:`cam2seg.evaluate.tuning.constrained_sweep`). They lead the table."""
    archive = truth_url if isinstance(truth_url, Archive) else Archive.open(truth_url)
    if not archive.has_masks:
        raise ArchiveError(f"{archive.source} has no masks: masks can only be scored against true masks")
    pair, labels, extra, notes = {}, {}, [], []
    res = SegmenterScores(Table(), "", objective)
    true_area = archive.true_areas()
    image_area = None
    if store_url:
        _log.info(f"scoring the pseudo-masks in {store_url}")
        dice, held, labels[STORE_ROW] = store_row(store_url, archive, true_area)
        if held.all():
            pair[STORE_ROW] = dice
        else:
            extra.append((STORE_ROW, labels[STORE_ROW], metrics.score_dice(dice[held], true_area[held])))
        runs = store.committed_runs(store_url)
        marker_model = runs[-1].model if runs else None
        classifier = classifier or (marker_model if runs and runs[-1].model_kind in ("classifier", "composed")
                                    else None)
        if marker_model:
            row = _card_cam_row(marker_model)
            if row:
                extra.append(row)
    probs, cls_probs = None, {}
    for url in segmenters:
        card = load_card(url)
        name = _seg_name(card, url)
        folder = url.rstrip("/").rsplit("/", 1)[-1]
        _log.info(f"{name}: out-of-fold maps of {url}")
        st = oof_seg_stats(url, archive, batch_size, device)
        image_area, probs = st.image_area, st.probs if probs is None else probs
        tuned = tuning.sweep(st.h_all, st.h_in, st.true_area, st.probs, st.image_area, objective=objective)
        ids = [f"segmenter:{folder}/paper", f"segmenter:{folder}/tuned-per-class"]
        pair[ids[0]], labels[ids[0]] = pair_dice(st, PAPER_SEGMENTER), f"{name}: paper (thr 0.2, min 0)"
        pair[ids[1]], labels[ids[1]] = pair_dice(st, tuned.per_class_pp), f"{name}: tuned per class (OOF)"
        res.tuned[url], res.row_ids[url], res.stats[url] = tuned, ids, st
        res.pairs.update({i: pair[i] for i in ids})
        if classifier:
            notes += _composed_rows(classifier, url, card, name, folder, archive, st, pair, labels, cls_probs,
                                    batch_size, device, floor, ceiling)
            # the card keeps them too, so the report shows what an unlabelled image gets
            res.row_ids[url] = ids + [k for k in (f"composed:{folder}/card", f"composed:{folder}/tuned-truth")
                                      if k in pair]
            res.pairs.update({i: pair[i] for i in res.row_ids[url]})
        cp = tuned.per_class_pp
        notes.append(f"{url}: tuned for the {objective} mean: threshold {cp.threshold}, min_seg_len "
                     f"{cp.min_seg_len}, confidence (map maximum) {cp.confidence}")
    if not pair and not extra:
        raise ValueError("nothing to evaluate: give a label store and/or segmenter artifacts")
    if image_area is None:
        shape = archive.image_shape(archive.image_ids[0])
        image_area = shape[0] * shape[1]
    accepted = probs >= 0.5 if probs is not None else None
    pair = {k: pair[k] for k in sorted(pair, key=lambda k: not k.startswith("composed:"))}  # unlabelled images first
    rows = scored_rows(pair, labels, true_area, image_area, accepted)
    for rid, label, scores in extra:
        rows[rid], rows.labels[rid] = scores, label
    n_def = int((true_area.sum(axis=1) > 0).sum())
    table = rows.format(list(archive.class_names),
                        f"Pseudo-masks and segmenters, out-of-fold, {n_def} defective images (paper's Table 3)")
    if accepted is not None:
        notes.append("baseline 'whole image if accepted': classes whose segmenter map maximum is >= 0.5")
    res.rows, res.table = rows, table + ("\n" + "\n".join(notes) if notes else "")
    return res


def _composed_rows(classifier: str, url: str, card, name: str, folder: str, archive: Archive, st, pair: dict,
                   labels: dict, cls_probs: dict, batch_size: int, device, floor: float, ceiling: float) -> list[str]:
    """Add the composed rows of segmenter ``url`` with ``classifier`` to ``pair`` / ``labels``;
    returns the notes (a segmenter on other folds than the classifier's gets none, and a note)."""
    try:
        cls_card = load_card(classifier)
        folds = shared_folds(classifier, url, archive)
    except (ArchiveError, ArtifactError) as e:
        return [f"no composed row for {url}: {e}"]
    if classifier not in cls_probs:
        cls_probs[classifier] = oof_probs(classifier, archive, folds, batch_size, device)
    comp_st = replace(st, probs=cls_probs[classifier])
    comp, why = composition_for(card, cls_card)
    rid = f"composed:{folder}/card"
    pair[rid] = pair_dice(comp_st, comp.setting())
    setting = "tuned on pseudo-masks, labels only" if comp.tuned_on and comp.tuned_on.startswith("pseudo") \
        else ("tuned on " + comp.tuned_on if comp.tuned_on else "default setting")
    labels[rid] = f"{name} + classifier gate, {setting}: what an unlabelled image gets"
    tuned = tuning.constrained_sweep(comp_st.h_all, comp_st.h_in, comp_st.true_area, comp_st.probs,
                                     comp_st.image_area, floor=floor, ceiling=ceiling)
    rid = f"composed:{folder}/tuned-truth"
    pair[rid] = pair_dice(comp_st, tuned.pp)
    labels[rid] = f"{name} + classifier gate, tuned on true masks (floor {floor}, ceiling {ceiling})"
    missed = [n for n, ok in zip(archive.class_names, tuned.met) if not ok]
    return [f"{url} + {classifier}: {why}; tuned on true masks: confidence {tuned.pp.confidence}, threshold "
            f"{tuned.pp.threshold}, min_seg_len {tuned.pp.min_seg_len}"
            + (f" (ceiling not met for {', '.join(missed)})" if missed else "")]


def write_segmenter_scores(url: str, scores: SegmenterScores) -> ModelCard:
    """Record the segmenter's tuned per-class setting (its masks' from now on), its rows (with
    the baselines on its own maps) and its sweep in its card; returns the rewritten card."""
    tuned, st, ids = scores.tuned[url], scores.stats[url], scores.row_ids[url]
    own = scored_rows({i: scores.pairs[i] for i in ids}, {i: scores.rows.label(i) for i in ids}, st.true_area,
                      st.image_area)
    post = CardPostProcess(**tuned.per_class_pp.model_dump(), tuned=True, objective=scores.objective)
    card = load_card(url)
    card = update_card(url, card, postprocess=post, metrics={**card.metrics, "seg_oof": card_rows(own, ids),
                                                             "seg_oof_sweep": tuned.curves()})
    _log.info(f"wrote tuned post-processing into {url}/model.json (version now {card.version})")
    return card


def evaluate_segmenters(truth_url: str, segmenters: list[str], store_url: str | None = None, *,
                        objective: str = "kaggle", write: bool = True, batch_size: int = 8,
                        device=None, classifier: str | None = None, floor: float = FLOOR,
                        ceiling: float = CEILING) -> tuple[Table, str]:
    """:func:`score_segmenters`, then (``write``) :func:`write_segmenter_scores` for each
    segmenter; returns (rows, printed table)."""
    scores = score_segmenters(truth_url, segmenters, store_url, objective=objective, batch_size=batch_size,
                              device=device, classifier=classifier, floor=floor, ceiling=ceiling)
    if write:
        for url in segmenters:
            write_segmenter_scores(url, scores)
    return scores.rows, scores.table
