"""Out-of-fold evaluation of segmenters and stored pseudo-masks: the paper's Table 3.

Rows, all on the archive's defective images, each beside the two trivial baselines:

* the pseudo-masks in a label store, as stored (what a segmenter trained on them saw);
* the classifier's tuned out-of-fold CAM masks (Table 2's best row), read from its card;
* per segmenter: its out-of-fold probability maps (each image by the fold model that did not
  train on it) with the paper's inference heuristics (threshold 0.2, no minimum area, no
  gate) and with post-processing tuned on these maps per class (gate: the map's maximum).

Tuning reuses :mod:`cam2seg.evaluate.tuning`'s histograms, so every setting is scored exactly without
recomputing a map.
"""

from __future__ import annotations

import sys

import numpy as np

from .. import io, metrics, rle, store
from . import tuning
from ..archive import Archive, ArchiveError
from ..artifact import load_card, update_card
from .cams import CamStats, _device, oof_map_stats, pair_dice
from ..folds import FOLDS_FILE, load_folds
from ..postprocess import PostProcess
from ..models.segmenter import load_segmenters, predict_maps

__all__ = ["oof_seg_stats", "store_pair_dice", "evaluate_segmenters", "tuned_cam_row", "PAPER_SEG"]

PAPER_SEG = PostProcess(confidence=0.0, threshold=0.2, min_seg_len=0)


def oof_seg_stats(seg_url: str, archive: Archive, batch_size: int = 8, device=None, log=None) -> CamStats:
    """Out-of-fold probability-map histograms of a segmenter artifact over ``archive``."""
    card, models = load_segmenters(seg_url, _device(device))
    folds = load_folds(io.join(seg_url, FOLDS_FILE))
    return oof_map_stats(archive, folds, models, card, lambda m, x, size: predict_maps(m, x, size), batch_size,
                         device, f"segmenter {seg_url}", log)


def store_pair_dice(store_url: str, archive: Archive, true_area: np.ndarray) -> np.ndarray:
    """Dice ``float[N, C]`` of the store's masks against the true masks (areas ``true_area``
    ``int[N, C]``) for every archive image; an image the store lacks counts as all-empty predictions."""
    table = store.read_masks(store_url, columns=["image_id", "class_id", "encoded_pixels", "height", "width"])
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
    missing = sum(1 for iid in archive.image_ids if (iid, archive.class_ids[0]) not in pred)
    if missing == n:
        raise ArchiveError(f"{store_url} holds no mask of any image of {archive.source}")
    return metrics.dice_from_counts(inter, p_area, true_area)


def tuned_cam_row(card) -> dict | None:
    """Table 2's tuned per-class row as a classifier card recorded it (kaggle/positive scores
    as plain lists), or None before ``cam2seg evaluate`` wrote it."""
    rows = card.metrics.get("cam_oof", {})
    name = next((n for n in rows if n.startswith("GradCAM++ + SWA + aug smooth, tuned (per class)")), None)
    return rows[name] if name is not None else None


def _card_cam_row(model_url: str) -> tuple[str, metrics.DiceScores] | None:
    """:func:`tuned_cam_row` of the classifier at ``model_url`` as a named table row, if evaluated."""
    try:
        card = load_card(model_url)
    except Exception:  # noqa: BLE001 - an unreadable card just leaves the row out
        return None
    r = tuned_cam_row(card)
    if r is None:
        return None
    return (f"CAM masks OOF, tuned per class (from {model_url}'s card)",
            metrics.DiceScores(np.asarray(r["kaggle"]), np.asarray(r["positive"]), r["kaggle_mean"],
                               r["positive_mean"], 0, np.zeros(len(r["kaggle"]), int)))


def _seg_name(card, url: str) -> str:
    """A row name that says what the segmenter learned from; prefixed by the artifact's folder
    name, so two segmenters with the same recipe stay two rows."""
    return f"{url.rstrip('/').rsplit('/', 1)[-1]}: {_recipe(card)}"


def _recipe(card) -> str:
    masks = card.training.get("masks", "?")
    if masks == "truth":
        return f"U-Net ({card.architecture}) on true masks"
    ref = card.training.get("refinements") or {}
    parts = [k for k in ("absent_zero",) if ref.get(k)]
    if ref.get("ignore_band"):
        parts.append(f"band {ref['ignore_band']}")
    if ref.get("present_empty") == "ignore":
        parts.append("present-empty ignored")
    return f"U-Net ({card.architecture}) on pseudo-masks{' (' + ', '.join(parts) + ')' if parts else ''}"


def evaluate_segmenters(truth_url: str, segmenters: list[str], store_url: str | None = None, *,
                        objective: str = "kaggle", write: bool = True, batch_size: int = 8, device=None,
                        log=None) -> tuple[dict, str]:
    """Table 3 for the archive at hand; returns (rows: name -> DiceScores, printed table). With
    ``write``, each segmenter's card gets its tuned post-processing and scores."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    archive = Archive.open(truth_url)
    if not archive.has_masks:
        raise ArchiveError(f"{archive.source} has no masks: masks can only be scored against true masks")
    pair, extra_rows, notes = {}, {}, []
    true_area = archive.true_areas()
    image_area = None
    if store_url:
        log(f"scoring the pseudo-masks in {store_url}")
        pair[f"CAM pseudo-masks as stored ({store_url})"] = store_pair_dice(store_url, archive, true_area)
        marker_model = (store.committed_runs(store_url) or [{}])[-1].get("model")
        if marker_model:
            row = _card_cam_row(marker_model)
            if row:
                extra_rows[row[0]] = row[1]
    probs = None
    for url in segmenters:
        card = load_card(url)
        name = _seg_name(card, url)
        log(f"{name}: out-of-fold maps of {url}")
        st = oof_seg_stats(url, archive, batch_size, device, log)
        image_area, probs = st.image_area, st.probs if probs is None else probs
        tuned = tuning.sweep(st.h_all, st.h_in, st.true_area, st.probs, st.image_area, objective=objective)
        rows_here = {f"{name}: paper (thr 0.2, min 0)": pair_dice(st, PAPER_SEG),
                     f"{name}: tuned per class (OOF)": pair_dice(st, tuned.per_class_pp)}
        pair.update(rows_here)
        cp = tuned.per_class_pp
        notes.append(f"{url}: tuned for the {objective} mean: threshold {cp.threshold}, min_seg_len "
                     f"{cp.min_seg_len}, confidence (map maximum) {cp.confidence}")
        if write:
            scored = metrics.dice_with_baselines(rows_here, st.true_area, st.image_area)
            post = {**cp.model_dump(), "tuned": True, "objective": objective}
            card = update_card(url, card, postprocess=post, metrics={**card.metrics, "seg_oof": {
                n: {"kaggle_mean": s.kaggle_mean, "positive_mean": s.positive_mean, "kaggle": s.kaggle.tolist(),
                    "positive": s.positive.tolist()} for n, s in scored.items() if n in rows_here},
                "seg_oof_sweep": tuned.curves()})
            log(f"wrote tuned post-processing into {url}/model.json (version now {card.version})")
    if not pair:
        raise ValueError("nothing to evaluate: give a label store and/or segmenter artifacts")
    if image_area is None:
        shape = archive.image_shape(archive.image_ids[0])
        image_area = shape[0] * shape[1]
    accepted = probs >= 0.5 if probs is not None else None
    rows = {**metrics.dice_with_baselines(pair, true_area, image_area, accepted), **extra_rows}
    n_def = int((true_area.sum(axis=1) > 0).sum())
    table = metrics.format_dice_table(
        rows, [f"class {c}" for c in archive.class_ids],
        title=f"Pseudo-masks and segmenters, out-of-fold, {n_def} defective images (paper's Table 3)")
    if accepted is not None:
        notes.append("baseline 'whole image if accepted': classes whose segmenter map maximum is >= 0.5")
    return rows, table + ("\n" + "\n".join(notes) if notes else "")
