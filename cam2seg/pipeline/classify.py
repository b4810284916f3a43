"""Stage 1 on Ray: K fold classifiers trained concurrently, then one model artifact.

The K folds run side by side as separate Ray Train runs (:mod:`cam2seg.train.fold_runner`), so a
killed job resumes each fold from its last epoch. The run key (a hash of the config, image
ids and labels) names the work folder ``<out>/_train/<run key>/``; a changed config or
archive starts afresh.
"""

from __future__ import annotations

import logging
import hashlib
import io as _io
import json
import time

import numpy as np

from .. import __version__, io, metrics, preprocess
from ..train import state
from ..archive import Archive
from ..artifact import ModelCard, write_artifact
from ..models.classifier import create_classifier
from ..postprocess import card_default
from ..config import ClassifierConfig
from ..folds import make_folds
from ..train import manifest
from ..train.classifier_task import OOF_FILE
from ..train.fold_runner import RUNTIME_ONLY, done_url, drop_checkpoints, fit_folds, trained_card
from ..train.loop import FINAL_FILE, RUN_FIELDS, SWA_FILE

__all__ = ["train_classifiers", "run_key", "weak_folds", "WeakFoldError"]

_log = logging.getLogger(__name__)



def run_key(cfg: ClassifierConfig, archive: Archive, channels: int = 1) -> str:
    """A hash of what determines the trained weights: config, image ids, labels, class names and
    the image channels."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json", exclude=RUNTIME_ONLY), sort_keys=True).encode())
    h.update("\n".join(archive.image_ids).encode())
    h.update(archive.labels.tobytes())
    h.update(json.dumps([list(archive.class_names), channels]).encode())
    return h.hexdigest()[:12]


def _warn_empty_classes(archive: Archive) -> None:
    """A class without a positive image cannot be learned: say so before training (its ROC-AUC
    is then undefined, recorded as null in the card)."""
    empty = [name for name, k in zip(archive.class_names, archive.labels.sum(0)) if k == 0]
    if empty:
        _log.warning(f"warning: no image of {archive.source} has class(es) {', '.join(empty)}: the model cannot "
                     "learn them (their ROC-AUC is undefined)")


def train_classifiers(data_url: str, out: str, cfg: ClassifierConfig, *, force: bool = False) -> ModelCard:
    """Train ``cfg.folds`` fold classifiers on the archive at ``data_url`` and write the
    artifact to ``out`` (model.json, fold-<k>.safetensors, oof.parquet, folds.csv)."""
    out = io.absolute(out)
    t0 = time.perf_counter()
    archive = Archive.open(data_url)
    sizes = archive.check_images()  # a non-image or an escaping symlink fails here, before any training
    n, c = archive.labels.shape
    if n < 2 * cfg.folds:
        raise ValueError(f"{n} images are too few for {cfg.folds} folds")
    channels = preprocess.detect_channels([archive.image_url(i) for i in archive.image_ids], cfg.channels)
    # Fail here, not in every fold's worker: the encoder must exist and take the stride.
    create_classifier(cfg.encoder, c, cfg.hidden, cfg.dropout, False, cfg.output_stride, cfg.pool, in_chans=channels)
    _warn_empty_classes(archive)
    key = run_key(cfg, archive, channels)
    card = trained_card(out, key, force)
    if card is not None:
        return card
    folds = make_folds(archive.labels, cfg.folds, cfg.seed)
    work = io.join(out, "_train", key)
    table = manifest.manifest_table(archive.image_ids, [archive.image_url(i) for i in archive.image_ids], folds,
                                    archive.labels)
    fit_folds("classifier", cfg, table, work, cfg.folds, extra={"num_classes": c, "channels": channels},
              staged=(SWA_FILE, OOF_FILE),
              what=f"folds of {cfg.encoder} at {cfg.size[0]}x{cfg.size[1]}, {'RGB' if channels == 3 else 'grey'}"
              f"{' (detected)' if cfg.channels == 'auto' else ''}, for {c} class(es) ("
              + ", ".join(f"{name}: {int(k)} images" for name, k in zip(archive.class_names, archive.labels.sum(0)))
              + ")", t0=t0)
    fold_aucs = [state.read_json(io.join(done_url(work, k), FINAL_FILE))["auc"] for k in range(cfg.folds)]
    weak = weak_folds(fold_aucs, list(archive.class_names), cfg.min_fold_auc)
    doubtful = weak_folds(fold_aucs, list(archive.class_names), max(WARN_FOLD_AUC, cfg.min_fold_auc))
    if doubtful and not weak:
        _log.warning(f"warning: fold health: {'; '.join(doubtful)}: such a fold has not learnt the class well, and "
                     "the ensemble's probability for it is pulled toward chance (classifier.min_fold_auc makes "
                     "this an error)")
    if weak:
        raise WeakFoldError(
            f"fold health check: {'; '.join(weak)} (classifier.min_fold_auc {cfg.min_fold_auc}). A fold that did not "
            "learn a class drags every new image's probability for it toward chance, so no model was written. "
            "Train again with another --seed, more --epochs or a lower lr_encoder (the finished folds stay under "
            f"{work}); set classifier.min_fold_auc: 0 to accept the folds as they are")
    card = _assemble(out, work, archive, folds, cfg, key, channels, sizes)
    drop_checkpoints(out, cfg)
    _log.info(f"wrote {out} (version {card.version}) in {time.perf_counter() - t0:.0f}s")
    return card


WARN_FOLD_AUC = 0.75  # a fold's validation ROC-AUC under this is logged as a warning whatever min_fold_auc is


class WeakFoldError(ValueError):
    """A fold's validation ROC-AUC for some class is under ``classifier.min_fold_auc``."""


def weak_folds(fold_aucs: list[list[float]], names: list[str], floor: float) -> list[str]:
    """One line per (fold, class) whose validation ROC-AUC (``fold_aucs[k][c]``) is under ``floor``;
    NaN (a fold with no image of a class, or none without it) is not judged."""
    return [f"fold {k}'s validation ROC-AUC for {names[c]} is {a:.3f}"
            for k, aucs in enumerate(fold_aucs) for c, a in enumerate(aucs)
            if a is not None and not np.isnan(a) and a < floor]


def _assemble(out, work, archive: Archive, folds: np.ndarray, cfg: ClassifierConfig, key: str,
              channels: int = 1, sizes: set | None = None) -> ModelCard:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..folds import FOLDS_FILE, folds_csv

    n, c = archive.labels.shape
    probs = np.full((n, c), np.nan, dtype=np.float32)
    states, fold_info, best_epoch = [], [], {}
    for k in range(cfg.folds):
        done = done_url(work, k)
        states.append(state.load_tensors(io.join(done, SWA_FILE)))
        # The single best epoch, kept for the "without SWA" rows of the CAM ablation.
        best_epoch[f"fold-{k}.best-epoch.safetensors"] = io.read_bytes(io.join(done, "top-0.safetensors"))
        oof = state.read_json(io.join(done, OOF_FILE))
        idx = [archive.index(i) for i in oof["image_ids"]]
        if (folds[idx] != k).any():
            raise RuntimeError(f"fold {k}: staged predictions belong to another split")
        probs[idx] = np.asarray(oof["probs"], dtype=np.float32)
        final = state.read_json(io.join(done, FINAL_FILE))
        fold_info.append({"fold": k, "workers": final["workers"], "swa_epochs": final["swa_epochs"], "val_loss": final["val_loss"],
                          "auc": final["auc"], "swa_bn_variants": final["swa_bn_variants"],
                          "history": final["history"],
                          **{key_: final.get(key_) for key_ in RUN_FIELDS}})
    if np.isnan(probs).any():
        raise RuntimeError(f"{int(np.isnan(probs).any(axis=1).sum())} images got no out-of-fold prediction")
    auc = metrics.roc_auc(archive.labels, probs)
    names = list(archive.class_names)
    _log.info("\n" + metrics.format_auc_table({f"{cfg.encoder} (OOF, {cfg.folds} folds)": auc}, names,
                                              title="ROC-AUC per class on the out-of-fold union (paper's Table 1)"))

    table = pa.table({
        "image_id": pa.array(archive.image_ids, pa.string()),
        "fold": pa.array(folds.astype(np.int8)),
        **{f"prob_{cid}": pa.array(probs[:, i]) for i, cid in enumerate(archive.class_ids)},
    })
    buf = _io.BytesIO()
    pq.write_table(table, buf)
    card = ModelCard(
        kind="classifier",
        architecture=cfg.encoder,
        num_classes=c,
        class_ids=archive.class_ids,
        class_names=list(archive.class_names),
        input_size=cfg.size,
        grayscale=channels == 1,
        mean=preprocess.normalisation(channels)[0],
        std=preprocess.normalisation(channels)[1],
        head={"hidden": cfg.hidden, "dropout": cfg.dropout, "output_stride": cfg.output_stride, "pool": cfg.pool},
        folds=cfg.folds,
        fold_files=[],
        # The paper's tuned post-processing, until the CAM stage tunes them on OOF maps.
        postprocess=card_default("classifier"),
        metrics={"oof_auc": {str(cid): float(a) for cid, a in zip(archive.class_ids, auc)},
                 "oof_auc_mean": float(np.nanmean(auc)), "folds": fold_info},
        training={"run_key": key, "config": cfg.model_dump(mode="json"), "cam2seg_version": __version__},
        data={"archive": archive.root, "source": archive.source, "images": n,
              # the one size every image had, or None when they differ (the label job then takes any size)
              "image_size": list(next(iter(sizes))) if sizes and len(sizes) == 1 else None,
              "image_sizes": len(sizes) if sizes else None,
              "images_per_class": {str(cid): int(s) for cid, s in zip(archive.class_ids, archive.labels.sum(0))}},
    )
    return write_artifact(out, card, states, extra={"oof.parquet": buf.getvalue(),
                                                    FOLDS_FILE: folds_csv(archive.image_ids, folds), **best_epoch})
