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
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import preprocess, io, metrics
from . import tuning
from ..archive import Archive, ArchiveError
from ..artifact import load_card, update_card
from ..cam import compute_cams
from ..models.classifier import load_fold_models
from ..folds import FOLDS_FILE, load_folds
from ..postprocess import PAPER, PostProcess

__all__ = ["CamStats", "oof_map_stats", "oof_cam_stats", "pair_dice", "evaluate_cams", "VARIANTS"]

# name -> (method, aug_smooth, weights)
VARIANTS = {
    "GradCAM": ("gradcam", False, "best-epoch"),
    "GradCAM++": ("gradcam++", False, "best-epoch"),
    "GradCAM++ + SWA + aug smooth": ("gradcam++", True, "swa"),
}
GUIDED_VARIANT = {"Guided GradCAM++ + SWA + aug smooth": ("guided-gradcam++", True, "swa")}


@dataclass
class CamStats:
    """OOF histograms of one CAM variant over an archive (see :mod:`cam2seg.evaluate.tuning`)."""

    image_ids: list[str]
    h_all: np.ndarray  # int64[N, C, BINS]
    h_in: np.ndarray
    true_area: np.ndarray  # int64[N, C]
    probs: np.ndarray  # float32[N, C]
    image_area: int
    seconds: float


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def oof_map_stats(archive: Archive, folds: dict[str, int], models: list, card, map_fn, batch_size: int = 8,
                  device=None, what: str = "maps", log=None) -> CamStats:
    """Histograms of maps in [0, 1] of every image of ``archive`` by its out-of-fold model.

    ``map_fn(model, x, out_size)`` -> (maps ``float[B, C, H, W]``, scores ``float[B, C]``); ``x``
    is the batch at ``card.input_size``, normalised with the card's mean and std.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    dev = _device(device)
    missing = [i for i in archive.image_ids if i not in folds]
    if missing:
        raise ArchiveError(f"{len(missing)} image(s) of {archive.root} are not in the model's folds "
                           f"(e.g. {missing[0]}): evaluate on the archive the model was trained on")
    shape = archive.image_shape(archive.image_ids[0])
    n, c = len(archive), card.num_classes
    out = CamStats(list(archive.image_ids), np.zeros((n, c, tuning.BINS), np.int64),
                   np.zeros((n, c, tuning.BINS), np.int64), np.zeros((n, c), np.int64),
                   np.zeros((n, c), np.float32), shape[0] * shape[1], 0.0)
    t0 = time.perf_counter()
    for k, model in enumerate(models):
        idx = [i for i, iid in enumerate(archive.image_ids) if folds[iid] == k]
        for s in range(0, len(idx), batch_size):
            rows = idx[s : s + batch_size]
            ids = [archive.image_ids[i] for i in rows]
            imgs = preprocess.load_images([archive.image_url(i) for i in ids], tuple(card.input_size))
            truth = np.stack([archive.masks(i, shape) for i in ids])
            x = preprocess.to_input(imgs, card.mean, card.std, device=dev)
            maps, scores = map_fn(model, x, shape)
            h_all, h_in = tuning.cam_histograms(maps, torch.from_numpy(truth).to(dev))
            out.h_all[rows], out.h_in[rows] = h_all, h_in
            out.true_area[rows] = truth.sum(axis=(-2, -1))
            out.probs[rows] = scores.cpu().numpy()
        log(f"  {what}: fold {k} done, "
            f"{(sum(folds[i] <= k for i in archive.image_ids)) / (time.perf_counter() - t0):.1f} images/s")
    out.seconds = time.perf_counter() - t0
    return out


def oof_cam_stats(model_url: str, archive: Archive, method: str, aug_smooth: bool, weights: str = "swa",
                  batch_size: int = 8, device=None, log=None) -> CamStats:
    """Map every image of ``archive`` with its out-of-fold classifier; return histograms."""
    card, models = load_fold_models(model_url, _device(device), weights=weights)
    folds = load_folds(io.join(model_url, FOLDS_FILE))
    return oof_map_stats(archive, folds, models, card,
                         lambda m, x, size: compute_cams(m, x, method, aug_smooth, out_size=size),
                         batch_size, device, f"{method}{' + aug' if aug_smooth else ''} ({weights})", log)


def pair_dice(st: CamStats, pp: PostProcess) -> np.ndarray:
    return metrics.dice_from_counts(*tuning.counts_at(st.h_all, st.h_in, st.true_area, st.probs, pp, st.image_area))


def evaluate_cams(model_url: str, truth_url: str, *, write: bool = True, objective: str = "kaggle",
                  batch_size: int = 8, guided: bool = True, device=None, log=None) -> tuple[dict, str]:
    """Table 2 for the archive at hand; tunes post-processing and (``write``) stores it in the card.

    Returns (rows: name -> DiceScores, printed table).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    archive = Archive.open(truth_url)
    if not archive.has_masks:
        raise ArchiveError(f"{archive.source} has no masks: CAM masks can only be scored against true masks")
    stats = {}
    for name, (method, aug, weights) in {**VARIANTS, **(GUIDED_VARIANT if guided else {})}.items():
        log(f"CAM variant: {name}")
        stats[name] = oof_cam_stats(model_url, archive, method, aug, weights, batch_size, device, log)
    final = stats["GradCAM++ + SWA + aug smooth"]
    tuned = tuning.sweep(final.h_all, final.h_in, final.true_area, final.probs, final.image_area,
                         objective=objective)
    pair = {f"{name} (paper: conf 0.5, thr 0.3, min 0)": pair_dice(st, PAPER) for name, st in stats.items()}
    pair["GradCAM++ + SWA + aug smooth, tuned (global)"] = pair_dice(final, tuned.global_pp)
    pair["GradCAM++ + SWA + aug smooth, tuned (per class)"] = pair_dice(final, tuned.per_class_pp)
    for name in GUIDED_VARIANT if guided else ():
        st = stats[name]
        own = tuning.sweep(st.h_all, st.h_in, st.true_area, st.probs, st.image_area, objective=objective)
        pair[f"{name}, tuned (per class)"] = pair_dice(st, own.per_class_pp)
    accepted = final.probs >= 0.5
    rows = metrics.dice_with_baselines(pair, final.true_area, final.image_area, accepted)
    n_def = int((final.true_area.sum(axis=1) > 0).sum())
    table = metrics.format_dice_table(
        rows, [f"class {i + 1}" for i in range(final.true_area.shape[1])],
        title=f"CAM pseudo-masks, out-of-fold, {n_def} defective images (paper's Table 2)")
    gp, cp = tuned.global_pp, tuned.per_class_pp
    notes = (f"tuned on these OOF maps for the {objective} mean: global confidence {gp.confidence}, threshold "
             f"{gp.threshold}, min_seg_len {gp.min_seg_len}; per class confidence {cp.confidence}, threshold "
             f"{cp.threshold}, min_seg_len {cp.min_seg_len}")
    table = table + "\n" + notes
    if write:
        card = load_card(model_url)
        post = {**cp.model_dump(), "global": gp.model_dump(), "tuned": True, "objective": objective,
                "method": "gradcam++", "aug_smooth": True}
        cam_metrics = {name: {"kaggle_mean": s.kaggle_mean, "positive_mean": s.positive_mean,
                              "kaggle": s.kaggle.tolist(), "positive": s.positive.tolist()}
                       for name, s in rows.items()}
        card = update_card(model_url, card, postprocess=post, metrics={**card.metrics, "cam_oof": cam_metrics,
                                                                       "cam_oof_sweep": tuned.curves()})
        log(f"wrote tuned post-processing into {model_url}/model.json (version now {card.version})")
    return rows, table
