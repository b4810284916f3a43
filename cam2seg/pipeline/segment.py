"""Stage 3 on Ray: K fold segmenters trained side by side on true masks or pseudo-masks.

``masks="truth"`` trains on the archive's true masks (the upper bound); a label store URL
trains on its committed pseudo-masks (newest run per image and class), refined with the
archive's image-level labels (:mod:`cam2seg.train.targets`). The folds are the classifier's when the
store names a classifier artifact covering the archive, so each image's out-of-fold
prediction comes from a segmenter that never saw it and whose pseudo-masks came from the same
split; otherwise :func:`cam2seg.folds.make_folds` with ``folds`` (default 5). Folds run as
separate Ray Train runs (:mod:`cam2seg.train.fold_runner`): a killed job resumes each fold from its
last epoch.

Mixed supervision (``true_masks``, a masks file of :mod:`cam2seg.truemasks`): the images it
covers train on their true masks, used as they are (no refinement, no ignore band) and seen
``true_mask_weight`` times per epoch; every other image on its refined pseudo-mask.

Memory: the driver holds the manifest's small columns for every image (ids, folds, labels, mask
sizes) and the mask strings of one fold at a time (:mod:`cam2seg.train.masks`); the run key
hashes the store's committed runs, not its strings, so a rerun that finds its model trained
reads no mask string.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pyarrow as pa

from .. import __version__, io, preprocess, store
from ..train import state
from ..archive import Archive, ArchiveError
from ..artifact import ArtifactError, ModelCard, load_card, write_artifact
from ..config import ComposeConfig, SegmenterConfig
from ..train import manifest
from ..train.fold_runner import config_digest, done_url, drop_checkpoints, fit_folds, trained_card
from ..folds import FOLDS_FILE, folds_csv, load_folds, make_folds
from ..models.segmenter import create_segmenter
from ..postprocess import card_default
from ..train.loop import FINAL_FILE, RUN_FIELDS, SWA_FILE
from ..train.masks import FoldMasks, file_digest, mask_keys, masks_digest, with_true_masks
from ..truemasks import read_true_masks

__all__ = ["train_segmenter"]

_log = logging.getLogger(__name__)


def _folds(archive: Archive, ids: list[str], cfg: SegmenterConfig, source: dict) -> np.ndarray:
    model = source.get("label_model")
    if cfg.folds is None and model:
        try:
            known = load_folds(io.join(model, FOLDS_FILE))
        except (FileNotFoundError, ValueError, OSError):
            known = {}
        if known and all(i in known for i in ids):
            _log.info(f"using the folds of {model} (the model that made the pseudo-masks)")
            return np.array([known[i] for i in ids], np.int64)
        _log.warning(f"warning: the folds of {model} do not cover the archive; making new ones")
    labels = archive.labels[[archive.index(i) for i in ids]]
    return make_folds(labels, cfg.folds or 5, cfg.seed)


def _run_key(cfg: SegmenterConfig, table: pa.Table, masks: str) -> str:
    """What determines the weights: the config, the manifest's rows without their mask strings
    (ids, folds, labels, sizes; not the images' location) and ``masks``, the
    :func:`masks_digest` of where the strings come from."""
    return hashlib.sha256((config_digest(cfg) + manifest.table_digest(table) + masks).encode()).hexdigest()[:12]


def train_segmenter(data_url: str, masks: str, out: str, cfg: SegmenterConfig | None = None, *, force: bool = False,
                    true_masks: str | None = None, compose: ComposeConfig | None = None) -> ModelCard:
    """Train K fold segmenters on the archive at ``data_url`` with ``masks`` ("truth" or a
    label store URL) and write the artifact to ``out`` (model.json, fold-<k>.safetensors,
    folds.csv). ``true_masks``: a masks file (:mod:`cam2seg.truemasks`) whose images train on
    their true masks instead (mixed supervision; with a store only). ``compose``: whether and how
    the composition with the classifier that made the pseudo-masks is tuned afterwards
    (:func:`cam2seg.evaluate.composed.tune_labels_only`). Returns its card."""
    cfg = cfg or SegmenterConfig()
    out = io.absolute(out)
    masks = masks if masks == "truth" else io.absolute(masks)
    t0 = time.perf_counter()
    archive = Archive.open(data_url)
    c = archive.num_classes
    if true_masks and masks == "truth":
        raise ValueError("--true-masks mixes true masks into pseudo-masks: give a label store as --masks "
                         "(with --masks truth every image already trains on its true mask)")
    channels = preprocess.detect_channels([archive.image_url(i) for i in archive.image_ids], cfg.channels)
    # an unknown architecture or encoder fails here, once
    create_segmenter(cfg.architecture, cfg.encoder, c, decoder_channels=cfg.decoder_channels, in_channels=channels)
    # the runs are read once: the run key and the manifest's strings come from the same runs,
    # also while a labeling job commits more
    runs = None if masks == "truth" else store.committed_runs(masks)
    if runs is not None:
        store.check_classes(masks, list(archive.class_names), f"archive {archive.source}", runs)
    rows, source = mask_keys(archive, masks, runs)
    true = tm = None
    if true_masks:
        tm = read_true_masks(true_masks, archive)
        if not len(tm):
            raise ValueError(f"{tm.source} covers no image of {archive.source}")
        rows = with_true_masks(archive, rows, tm)
        true = rows.column("true").to_numpy(zero_copy_only=False)
        source["supervision"] = {"true_masks": tm.source, "true_masks_sha256": file_digest(tm.source),
                                 "true_mask_images": int(true.sum()),
                                 "pseudo_mask_images": int((~true).sum()), "true_mask_weight": cfg.true_mask_weight}
        _log.info(f"mixed supervision: {int(true.sum())} image(s) on the true masks of {tm.source} "
                  f"({tm.positives} non-empty), {int((~true).sum())} on pseudo-masks")
    ids = rows.column("image_id").to_pylist()
    shapes = np.stack([rows.column("height").to_numpy(), rows.column("width").to_numpy()], axis=1)
    labels = archive.labels[[archive.index(i) for i in ids]]
    folds = _folds(archive, ids, cfg, source)
    k_folds = int(folds.max()) + 1
    if min(np.bincount(folds, minlength=k_folds)) < 1 or len(ids) < 2 * k_folds:
        raise ValueError(f"{len(ids)} images are too few for {k_folds} folds")
    size = tuple(int(v) for v in (cfg.size or shapes[0]))
    refine = masks != "truth"
    table = manifest.manifest_table(ids, [archive.image_url(i) for i in ids], folds, labels, None, shapes,
                                    true=true, repeat=cfg.true_mask_weight)
    key = _run_key(cfg, table, masks_digest(archive, masks, runs, tm) + f"|{list(archive.class_names)}|{channels}")
    card = trained_card(out, key, force)
    if card is not None:
        return _composed(out, card, archive, masks, source, compose)
    work = io.join(out, "_train", key)
    what = "true masks" if not refine else f"pseudo-masks of {masks}" + (" and true masks" if true is not None else "")
    fit_folds("segmenter", cfg, table, work, k_folds, staged=(SWA_FILE,), t0=t0,
              extra={"num_classes": c, "channels": channels, "size": list(size), "refine": refine},
              what=f"fold segmenters ({cfg.architecture}, {cfg.encoder}) on {what} at {size[0]}x{size[1]}, "
              f"{'RGB' if channels == 3 else 'grey'}, for {c} class(es) ({', '.join(archive.class_names)})",
              fill=FoldMasks(archive, masks, runs, table, tm))

    states, fold_info = [], []
    for k in range(k_folds):
        done = done_url(work, k)
        states.append(state.load_tensors(io.join(done, SWA_FILE)))
        final = state.read_json(io.join(done, FINAL_FILE))
        fold_info.append({key_: final.get(key_) for key_ in ("fold", "workers", "swa_epochs", "val_loss", "history",
                                                             "ignored_fraction", *RUN_FIELDS)})
    card = ModelCard(
        kind="segmenter", architecture=cfg.encoder, num_classes=c, class_ids=archive.class_ids,
        class_names=list(archive.class_names), input_size=size,
        grayscale=channels == 1, mean=preprocess.normalisation(channels)[0], std=preprocess.normalisation(channels)[1],
        head={"architecture": cfg.architecture, "decoder_channels": cfg.decoder_channels},
        folds=k_folds, fold_files=[], postprocess=card_default("segmenter"),
        metrics={"folds": fold_info, "val_loss_mean": float(np.mean([f["val_loss"] for f in fold_info]))},
        training={"run_key": key, "config": cfg.model_dump(mode="json"), "cam2seg_version": __version__,
                  "refinements": {"absent_zero": cfg.absent_zero, "present_empty": cfg.present_empty,
                                  "ignore_band": cfg.ignore_band} if refine else None, **source},
        data={"archive": archive.root, "source": archive.source, "images": len(ids),
              "image_size": [int(v) for v in shapes[0]]},
    )
    card = write_artifact(out, card, states, extra={FOLDS_FILE: folds_csv(ids, folds)})
    drop_checkpoints(out, cfg)
    _log.info(f"wrote {out} (segmenter, version {card.version}) in {time.perf_counter() - t0:.0f}s")
    return _composed(out, card, archive, masks, source, compose)


def _composed(out: str, card: ModelCard, archive: Archive, masks: str, source: dict,
              compose: ComposeConfig | None) -> ModelCard:
    """The card with a composition tuned on the store's pseudo-masks (labels only) with the
    classifier that made them, unless it has one for that classifier already or tuning is off."""
    compose = compose or ComposeConfig()
    model = source.get("label_model")
    if masks == "truth" or not compose.tune or not model:
        return card
    from ..evaluate.composed import METHOD, tune_labels_only, write_composition
    from ..models.compose import CARD_KEY, weights_digest

    try:
        classifier = load_card(model)
    except (ArtifactError, FileNotFoundError, OSError) as e:
        _log.warning(f"warning: no composition tuned: the classifier {model} that made the masks cannot be read ({e})")
        return card
    if classifier.kind != "classifier":
        return card
    have = card.metrics.get(CARD_KEY) or {}
    want = f"pseudo-masks of {masks}"
    same = dict(classifier_version=weights_digest(classifier), tuned_on=want, floor=compose.floor,
                ceiling=compose.ceiling, method=METHOD)
    if all(have.get(k) == v for k, v in same.items()):
        return card
    _log.info(f"tuning the composition with {model} out of fold on the {want} (labels only: no true mask read)")
    try:
        comp = tune_labels_only(out, model, archive, masks, floor=compose.floor, ceiling=compose.ceiling)
    except ArchiveError as e:
        _log.warning(f"warning: no composition tuned: {e}")
        return card
    sc = comp.scores
    _log.info("composition per class (" + ", ".join(archive.class_names) + f"): confidence {comp.confidence}, "
              f"threshold {comp.threshold}, min_seg_len {comp.min_seg_len}; against the pseudo-masks: Kaggle "
              f"{sc['kaggle']}, positive-pair {sc['positive']}, absent masked {sc['absent_masked']}")
    return write_composition(out, comp)
