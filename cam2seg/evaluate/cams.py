"""Out-of-fold evaluation of CAM pseudo-masks: the paper's Table 2 for the archive at hand.

Every image is mapped by the fold model that did not train on it. Maps are reduced on the
fly to per-(image, class) histograms (:mod:`cam2seg.evaluate.tuning`), so no full-resolution map is
kept and any post-processing setting scores without recomputing a CAM. The rows:

* GradCAM and GradCAM++ with each fold's best single epoch, no aug smoothing;
* GradCAM++ + SWA + aug smoothing (the paper's improvements);
* the same with post-processing tuned on these OOF maps, globally and per class;
* Guided GradCAM++ + SWA + aug smooth (the paper's pixel-precise variant; ``guided=False``
  skips it, as it costs a full backward per class), at the paper's setting and tuned per
  class on its own maps;

all at the paper's post-processing (confidence 0.5, threshold 0.3, min_seg_len 0) unless
tuned, with the two baselines beside them (all-empty; whole image for every class the
classifier accepts at confidence 0.5).

Scoring (:func:`score_cams`) only computes; :func:`write_cam_scores` records the tuned setting
and the rows in the classifier's card; :func:`evaluate_cams` is the two in a row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .. import io, metrics, preprocess
from . import tuning
from .rows import Table, card_rows, scored_rows
from ..archive import Archive, ArchiveError
from ..artifact import ModelCard, load_card, update_card
from ..folds import FOLDS_FILE, load_folds
from ..models.predict import Predictor, load_predictor
from ..postprocess import DEFAULT_CAM, PAPER, CardPostProcess, PostProcess
from ..classes import check_same
from ..refine import DEFAULT_REFINE, NO_REFINE, Refine, refine_maps

__all__ = ["CamStats", "CamScores", "oof_map_stats", "oof_cam_stats", "pair_dice", "score_cams", "write_cam_scores",
           "evaluate_cams", "VARIANTS", "GUIDED_VARIANT", "REFINED", "TUNED_VARIANT", "TUNED_ROW", "DEFAULTS_ROW"]

_log = logging.getLogger(__name__)

# CAM passes: row id -> (label, method, aug_smooth, weights)
VARIANTS = {
    "gradcam": ("GradCAM", "gradcam", False, "best-epoch"),
    "gradcam++": ("GradCAM++", "gradcam++", False, "best-epoch"),
    "gradcam++_swa_aug": ("GradCAM++ + SWA + aug smooth", "gradcam++", True, "swa"),
}
GUIDED_VARIANT = {"guided-gradcam++_swa_aug": ("Guided GradCAM++ + SWA + aug smooth", "guided-gradcam++", True, "swa")}
UNREFINED_VARIANT = "gradcam++_swa_aug"
# refinements of the UNREFINED_VARIANT's maps (one CAM pass): row id -> (label suffix, refinement)
REFINED = {
    f"{UNREFINED_VARIANT}_par": ("PAR", Refine(steps=["par"])),
    f"{UNREFINED_VARIANT}_contrast": ("contrast", Refine(steps=["contrast"])),
    f"{UNREFINED_VARIANT}_contrast_par": ("contrast + PAR", DEFAULT_REFINE),
}
TUNED_VARIANT = f"{UNREFINED_VARIANT}_contrast_par"  # the variant whose tuned setting the card keeps
TUNED_ROW = f"{TUNED_VARIANT}/tuned-per-class"
DEFAULTS_ROW = f"{TUNED_VARIANT}/defaults-labels"  # the labels-only user's row: nothing tuned on truth


@dataclass
class CamStats:
    """OOF histograms of one map variant over an archive (see :mod:`cam2seg.evaluate.tuning`)."""

    image_ids: list[str]
    h_all: np.ndarray  # int64[N, C, BINS]
    h_in: np.ndarray
    true_area: np.ndarray  # int64[N, C]
    probs: np.ndarray  # float32[N, C]
    image_area: int
    seconds: float


def oof_map_stats(archive: Archive, folds: dict[str, int], predictor: Predictor, batch_size: int = 8,
                  what: str = "maps", refines: dict[str, Refine | None] | None = None):
    """Histograms of ``predictor``'s maps in [0, 1] of every image of ``archive``, each image
    mapped by its out-of-fold model (``folds``: image id -> fold).

    ``refines`` (id -> refinement, None: the raw maps): one map pass, each refinement applied
    to its maps at the input size; returns id -> :class:`CamStats`. Without it, one
    :class:`CamStats` of the predictor's own maps."""
    check_same(archive.class_names, f"archive {archive.source}", predictor.card.names, what)
    missing = [i for i in archive.image_ids if i not in folds]
    if missing:
        raise ArchiveError(f"{len(missing)} image(s) of {archive.root} are not in the model's folds "
                           f"(e.g. {missing[0]}): evaluate on the archive the model was trained on")
    single = refines is None
    if single:
        refines = {"": predictor.refine}
    raw = replace(predictor, refine=None)
    card, dev = predictor.card, predictor.device
    shape = archive.image_shape(archive.image_ids[0])
    # one header read per image (evaluation reads every image anyway)
    sizes_vary = len({tuple(archive.image_shape(i)) for i in archive.image_ids}) > 1
    n, c = len(archive), card.num_classes
    out = {rid: CamStats(list(archive.image_ids), np.zeros((n, c, tuning.BINS), np.int64),
                         np.zeros((n, c, tuning.BINS), np.int64), np.zeros((n, c), np.int64),
                         np.zeros((n, c), np.float32), shape[0] * shape[1], 0.0) for rid in refines}
    t0 = time.perf_counter()
    for k in range(len(predictor.models)):
        idx = [i for i, iid in enumerate(archive.image_ids) if folds[iid] == k]
        for s in range(0, len(idx), batch_size):
            rows = idx[s : s + batch_size]
            ids = [archive.image_ids[i] for i in rows]
            imgs = preprocess.load_images([archive.image_url(i) for i in ids], tuple(card.input_size),
                                          channels=card.channels)
            # an archive may mix image sizes: each image is scored at its own
            shapes = [tuple(archive.image_shape(i)) for i in ids] if sizes_vary else [tuple(shape)] * len(ids)
            truths = [torch.from_numpy(archive.masks(i, sh)).to(dev) for i, sh in zip(ids, shapes)]
            maps, scores = raw.maps(imgs, fold=k)  # at the input size
            pixels, cache = raw.pixels(imgs), {}
            for rid, refine in refines.items():
                m = refine_maps(maps, pixels, refine, cache)
                st = out[rid]
                for j, (row, sh, truth) in enumerate(zip(rows, shapes, truths)):
                    mj = m[j : j + 1]
                    if tuple(mj.shape[-2:]) != sh:
                        mj = F.interpolate(mj, size=sh, mode="bilinear", align_corners=False)
                    h_all, h_in = tuning.cam_histograms(mj, truth[None])
                    st.h_all[row], st.h_in[row] = h_all[0], h_in[0]
                    st.true_area[row] = truth.sum(dim=(-2, -1)).cpu().numpy()
                st.probs[rows] = scores.cpu().numpy()
        _log.info(f"  {what}: fold {k} done, "
                  f"{(sum(folds[i] <= k for i in archive.image_ids)) / (time.perf_counter() - t0):.1f} images/s")
    for st in out.values():
        st.seconds = time.perf_counter() - t0
    return out[""] if single else out


def oof_cam_stats(model_url: str, archive: Archive, method: str, aug_smooth: bool, weights: str = "swa",
                  batch_size: int = 8, device=None, refines: dict[str, Refine | None] | None = None,
                  fuse_strides: tuple[int, ...] = ()):
    """Map every image of ``archive`` with its out-of-fold classifier; return histograms (of
    the raw maps, or id -> histograms of each of ``refines``, see :func:`oof_map_stats`)."""
    predictor = load_predictor(model_url, device, weights=weights, method=method, aug_smooth=aug_smooth,
                               refine=NO_REFINE, fuse_strides=fuse_strides)
    folds = load_folds(io.join(model_url, FOLDS_FILE))
    what = f"{method}{' + aug' if aug_smooth else ''}{f' fused {fuse_strides}' if fuse_strides else ''}"
    return oof_map_stats(archive, folds, predictor, batch_size, f"{what} ({weights})", refines)


def pair_dice(st: CamStats, pp: PostProcess, gate: np.ndarray | None = None) -> np.ndarray:
    """Pair Dice ``float[N, C]`` at ``pp``; ``gate`` (0/1 image labels ``[N, C]``) replaces the
    classifier's probabilities in the confidence test, as ``cam2seg label --labels`` does."""
    probs = st.probs if gate is None else np.asarray(gate, np.float32)
    if gate is not None:
        pp = pp.model_copy(update={"confidence": 0.5})
    return metrics.dice_from_counts(*tuning.counts_at(st.h_all, st.h_in, st.true_area, probs, pp, st.image_area))


@dataclass
class CamScores:
    """What :func:`score_cams` found: the rows (id -> Dice), the printed table, the tuned
    settings and the sweep curves of :data:`TUNED_VARIANT`."""

    rows: Table
    table: str
    tuned: tuning.Tuned
    objective: str


def score_cams(model_url: str, truth_url: str, *, objective: str = "kaggle", batch_size: int = 8,
               guided: bool = True, device=None) -> CamScores:
    """Table 2 for the archive at hand (``truth_url``, or an Archive such as
    :func:`cam2seg.truemasks.covered_archive`'s), post-processing tuned on the OOF maps (nothing written)."""
    archive = truth_url if isinstance(truth_url, Archive) else Archive.open(truth_url)
    if not archive.has_masks:
        raise ArchiveError(f"{archive.source} has no masks: CAM masks can only be scored against true masks")
    variants = {**VARIANTS, **(GUIDED_VARIANT if guided else {})}
    stats = {}
    for vid, (label, method, aug, weights) in variants.items():
        _log.info(f"CAM variant: {label}")
        if vid == UNREFINED_VARIANT:
            refines = {vid: None, **{rid: r for rid, (_, r) in REFINED.items()}}
            stats.update(oof_cam_stats(model_url, archive, method, aug, weights, batch_size, device, refines))
        else:
            stats[vid] = oof_cam_stats(model_url, archive, method, aug, weights, batch_size, device)
    variants.update({rid: (f"{variants[UNREFINED_VARIANT][0]} + {suffix}", *variants[UNREFINED_VARIANT][1:])
                     for rid, (suffix, _) in REFINED.items()})
    final, labels_gate = stats[TUNED_VARIANT], archive.labels.astype(np.float32)
    tuned = tuning.sweep(final.h_all, final.h_in, final.true_area, final.probs, final.image_area,
                         objective=objective)
    pair, labels = {}, {}
    thr = DEFAULT_CAM.threshold
    for vid, st in stats.items():
        if vid in REFINED:  # the paper's threshold is for raw maps: refined ones at cam2seg's default
            rid = f"{vid}/defaults-labels"
            pair[rid] = pair_dice(st, DEFAULT_CAM, labels_gate)
            labels[rid] = f"{variants[vid][0]}, defaults (no true masks used: thr {thr}), image labels gate"
        else:
            pair[f"{vid}/paper"] = pair_dice(st, PAPER)
            labels[f"{vid}/paper"] = f"{variants[vid][0]} (paper: conf 0.5, thr 0.3, min 0)"
    name = variants[TUNED_VARIANT][0]
    pair[f"{TUNED_VARIANT}/defaults"] = pair_dice(final, DEFAULT_CAM)
    labels[f"{TUNED_VARIANT}/defaults"] = f"{name}, defaults (no true masks used: conf {DEFAULT_CAM.confidence}, thr {thr})"
    pair[f"{TUNED_VARIANT}/tuned-global"] = pair_dice(final, tuned.global_pp)
    labels[f"{TUNED_VARIANT}/tuned-global"] = f"{name}, tuned on true masks (global)"
    pair[TUNED_ROW], labels[TUNED_ROW] = pair_dice(final, tuned.per_class_pp), f"{name}, tuned on true masks (per class)"
    by_labels = tuning.sweep(final.h_all, final.h_in, final.true_area, labels_gate, final.image_area,
                             objective=objective)
    pair[f"{TUNED_VARIANT}/tuned-labels"] = pair_dice(final, by_labels.per_class_pp, labels_gate)
    labels[f"{TUNED_VARIANT}/tuned-labels"] = f"{name}, tuned on true masks (per class), image labels gate"
    unrefined = stats[UNREFINED_VARIANT]
    own = tuning.sweep(unrefined.h_all, unrefined.h_in, unrefined.true_area, unrefined.probs, unrefined.image_area,
                       objective=objective)
    pair[f"{UNREFINED_VARIANT}/tuned-per-class"] = pair_dice(unrefined, own.per_class_pp)
    labels[f"{UNREFINED_VARIANT}/tuned-per-class"] = f"{variants[UNREFINED_VARIANT][0]}, tuned on true masks (per class)"
    for vid in GUIDED_VARIANT if guided else ():
        st = stats[vid]
        own = tuning.sweep(st.h_all, st.h_in, st.true_area, st.probs, st.image_area, objective=objective)
        pair[f"{vid}/tuned-per-class"] = pair_dice(st, own.per_class_pp)
        labels[f"{vid}/tuned-per-class"] = f"{variants[vid][0]}, tuned on true masks (per class)"
    rows = scored_rows(pair, labels, final.true_area, final.image_area, final.probs >= 0.5)
    n_def = int((final.true_area.sum(axis=1) > 0).sum())
    table = rows.format(list(archive.class_names),
                        f"CAM pseudo-masks, out of fold, {len(archive)} images of which {n_def} defective (paper's Table 2)")
    gp, cp = tuned.global_pp, tuned.per_class_pp
    table += (f"\ntuned on these OOF maps for the {objective} mean: global confidence {gp.confidence}, threshold "
              f"{gp.threshold}, min_seg_len {gp.min_seg_len}; per class confidence {cp.confidence}, threshold "
              f"{cp.threshold}, min_seg_len {cp.min_seg_len}")
    return CamScores(rows, table, tuned, objective)


def write_cam_scores(model_url: str, scores: CamScores) -> ModelCard:
    """Record the tuned per-class setting (the labeling job's from now on), the rows and the sweep
    in the classifier's card; returns the rewritten card (its version changes)."""
    _, method, aug, _ = VARIANTS[UNREFINED_VARIANT]
    refine = REFINED[TUNED_VARIANT][1]
    t = scores.tuned
    post = CardPostProcess(**t.per_class_pp.model_dump(), global_setting=t.global_pp, tuned=True,
                           objective=scores.objective, method=method, aug_smooth=aug, refine=refine)
    card = load_card(model_url)
    card = update_card(model_url, card, postprocess=post, metrics={
        **card.metrics, "cam_oof": card_rows(scores.rows), "cam_oof_sweep": t.curves()})
    _log.info(f"wrote tuned post-processing into {model_url}/model.json (version now {card.version})")
    return card


def evaluate_cams(model_url: str, truth_url: str, *, write: bool = True, objective: str = "kaggle",
                  batch_size: int = 8, guided: bool = True, device=None) -> tuple[Table, str]:
    """:func:`score_cams`, then (``write``) :func:`write_cam_scores`; returns (rows, printed table)."""
    scores = score_cams(model_url, truth_url, objective=objective, batch_size=batch_size, guided=guided,
                        device=device)
    if write:
        write_cam_scores(model_url, scores)
    return scores.rows, scores.table
