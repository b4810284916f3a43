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

from .. import __version__, io, metrics
from ..train import state
from ..archive import Archive
from ..artifact import ModelCard, write_artifact
from ..models.classifier import create_classifier
from ..postprocess import card_default
from ..config import ClassifierConfig
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..folds import make_folds
from ..train import manifest
from ..train.classifier_task import OOF_FILE
from ..train.fold_runner import RUNTIME_ONLY, done_url, drop_checkpoints, fit_folds, trained_card
from ..train.loop import FINAL_FILE, RUN_FIELDS, SWA_FILE

__all__ = ["train_classifiers", "run_key"]

_log = logging.getLogger(__name__)



def run_key(cfg: ClassifierConfig, archive: Archive) -> str:
    """A hash of what determines the trained weights: config, image ids and labels."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json", exclude=RUNTIME_ONLY), sort_keys=True).encode())
    h.update("\n".join(archive.image_ids).encode())
    h.update(archive.labels.tobytes())
    return h.hexdigest()[:12]


def train_classifiers(data_url: str, out: str, cfg: ClassifierConfig, *, force: bool = False) -> ModelCard:
    """Train ``cfg.folds`` fold classifiers on the archive at ``data_url`` and write the
    artifact to ``out`` (model.json, fold-<k>.safetensors, oof.parquet, folds.csv)."""
    out = io.absolute(out)
    t0 = time.perf_counter()
    archive = Archive.open(data_url)
    archive.check_images()  # a non-image or an escaping symlink fails here, before any training
    n, c = archive.labels.shape
    if n < 2 * cfg.folds:
        raise ValueError(f"{n} images are too few for {cfg.folds} folds")
    # Fail here, not in every fold's worker: the encoder must exist and take the stride.
    create_classifier(cfg.encoder, c, cfg.hidden, cfg.dropout, False, cfg.output_stride, cfg.pool)
    key = run_key(cfg, archive)
    card = trained_card(out, key, force)
    if card is not None:
        return card
    folds = make_folds(archive.labels, cfg.folds, cfg.seed)
    work = io.join(out, "_train", key)
    table = manifest.manifest_table(archive.image_ids, [archive.image_url(i) for i in archive.image_ids], folds,
                                    archive.labels)
    fit_folds("classifier", cfg, table, work, cfg.folds, extra={"num_classes": c}, staged=(SWA_FILE, OOF_FILE),
              what=f"folds of {cfg.encoder} at {cfg.size[0]}x{cfg.size[1]}", t0=t0)
    card = _assemble(out, work, archive, folds, cfg, key)
    drop_checkpoints(out, cfg)
    _log.info(f"wrote {out} (version {card.version}) in {time.perf_counter() - t0:.0f}s")
    return card


def _assemble(out, work, archive: Archive, folds: np.ndarray, cfg: ClassifierConfig, key: str) -> ModelCard:
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
    names = [f"class {cid}" for cid in archive.class_ids]
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
        input_size=cfg.size,
        grayscale=True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        head={"hidden": cfg.hidden, "dropout": cfg.dropout, "output_stride": cfg.output_stride, "pool": cfg.pool},
        folds=cfg.folds,
        fold_files=[],
        # The paper's tuned post-processing, until the CAM stage tunes them on OOF maps.
        postprocess=card_default("classifier"),
        metrics={"oof_auc": {str(cid): float(a) for cid, a in zip(archive.class_ids, auc)},
                 "oof_auc_mean": float(np.nanmean(auc)), "folds": fold_info},
        training={"run_key": key, "config": cfg.model_dump(mode="json"), "cam2seg_version": __version__},
        data={"archive": archive.root, "source": archive.source, "images": n,
              "image_size": list(archive.image_shape(archive.image_ids[0])),
              "images_per_class": {str(cid): int(s) for cid, s in zip(archive.class_ids, archive.labels.sum(0))}},
    )
    return write_artifact(out, card, states, extra={"oof.parquet": buf.getvalue(),
                                                    FOLDS_FILE: folds_csv(archive.image_ids, folds), **best_epoch})
