"""Stage 1 on Ray: K fold classifiers trained concurrently, then one model artifact.

Each fold is its own Ray Train run (a ``TorchTrainer`` with its own workers, GPUs and
``FailureConfig``), driven by a zero-CPU Ray task so the K runs proceed side by side on
whatever cluster ``ray.init`` finds. Ray 2.60 has no built-in cross-validation; Ray's own
guide nests ``TorchTrainer`` runs in Tune trials for this. Plain tasks do the same job with
less machinery: no trial resources to reserve (a Tune trial holds a CPU by default, which on
a small machine starves the training workers), and no experiment state of a second kind,
because each fold's Train run already keeps its own checkpoints in storage.

Re-running after a kill continues: a fold whose run finished is staged under
``<out>/_train/<run key>/done/fold-<k>/`` and skipped; a fold that was interrupted resumes
from its last epoch's checkpoint (same run name and storage path). A changed config or
archive gives another run key, hence a fresh start.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import sys
import time

import numpy as np

from . import __version__, io, metrics, state
from .archive import Archive
from .artifact import ModelCard, load_card, write_artifact
from .classifier import create_classifier
from .config import ClassifierConfig
from .data import IMAGENET_MEAN, IMAGENET_STD
from .folds import make_folds
from .raycluster import cluster_gpus, ensure_ray
from .train_classifier import FINAL_FILE, OOF_FILE, SWA_FILE, train_fold_loop

__all__ = ["train_classifiers", "run_key"]

# Settings that change how a run executes but not what it learns: they stay out of the run key.
_RUNTIME_ONLY = {"load_threads", "keep_checkpoints", "max_failures", "workers_per_fold", "cpus_per_worker", "gpus_per_worker"}


def run_key(cfg: ClassifierConfig, archive: Archive) -> str:
    """A hash of what determines the trained weights: config, image ids and labels."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json", exclude=_RUNTIME_ONLY), sort_keys=True).encode())
    h.update("\n".join(archive.image_ids).encode())
    h.update(archive.labels.tobytes())
    return h.hexdigest()[:12]


def _storage(url: str):
    """(storage_path, storage_filesystem) for Ray Train from an fsspec URL."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = io.filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _fold_task(fold: int, loop_config: dict, work: str, cfg: ClassifierConfig, gpus: float) -> dict:
    """Train one fold with Ray Train and stage its final outputs under ``work/done/fold-<k>``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = _storage(io.join(work, "runs"))
    trainer = TorchTrainer(
        train_fold_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers_per_fold, use_gpu=gpus > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=RunConfig(
            name=f"fold-{fold}", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's INFO lines (one per checkpoint) drown the epoch lines.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fold {fold}: training ended without a checkpoint")
    done = io.join(work, "done", f"fold-{fold}")
    with result.checkpoint.as_directory() as d:
        if not os.path.exists(os.path.join(d, FINAL_FILE)):
            raise RuntimeError(f"fold {fold}: the last checkpoint is not a final one ({result.checkpoint.path})")
        # The final marker is written last so a half-staged fold counts as not done.
        names = sorted(os.listdir(d), key=lambda n: n == FINAL_FILE)
        for name in names:
            if name in (SWA_FILE, OOF_FILE, FINAL_FILE) or name.startswith("top-"):
                with open(os.path.join(d, name), "rb") as f:
                    io.write_bytes(io.join(done, name), f.read())
    return {"fold": fold, "checkpoint": result.checkpoint.path}


def _gpus_per_worker(cfg: ClassifierConfig) -> float:
    if cfg.gpus_per_worker is not None:
        return cfg.gpus_per_worker
    return 1.0 if cluster_gpus() >= 1 else 0.0


def train_classifiers(data_url: str, out: str, cfg: ClassifierConfig, *, force: bool = False,
                      log=None) -> ModelCard:
    """Train ``cfg.folds`` fold classifiers on the archive at ``data_url`` and write the
    artifact to ``out`` (model.json, fold-<k>.safetensors, oof.parquet, folds.csv)."""
    import ray

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    archive = Archive.open(data_url)
    n, c = archive.labels.shape
    if n < 2 * cfg.folds:
        raise ValueError(f"{n} images are too few for {cfg.folds} folds")
    # Fail here, not in every fold's worker: the encoder must exist and take the stride.
    create_classifier(cfg.encoder, c, cfg.hidden, cfg.dropout, False, cfg.output_stride)
    key = run_key(cfg, archive)
    if not force and io.exists(io.join(out, "model.json")):
        card = load_card(out)
        if card.training.get("run_key") == key:
            log(f"{out} already holds this model (run {key}, version {card.version}); use --force to retrain")
            return card
    folds = make_folds(archive.labels, cfg.folds, cfg.seed)
    work = io.join(out, "_train", key)
    ensure_ray()
    gpus = _gpus_per_worker(cfg)
    urls = [archive.image_url(i) for i in archive.image_ids]
    task = ray.remote(num_cpus=0, max_retries=0)(_fold_task)
    pending = {}
    for k in range(cfg.folds):
        if io.exists(io.join(work, "done", f"fold-{k}", FINAL_FILE)):
            log(f"fold {k}: finished in an earlier run, reusing it")
            continue
        tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        loop_config = {
            "classifier": cfg.model_dump(mode="json"),
            "fold": k,
            "train_urls": [urls[i] for i in tr],
            "val_urls": [urls[i] for i in va],
            "train_labels": archive.labels[tr].tolist(),
            "val_labels": archive.labels[va].tolist(),
            "val_ids": [archive.image_ids[i] for i in va],
        }
        pending[task.options(name=f"cam2seg-fold-{k}").remote(k, loop_config, work, cfg, gpus)] = k
    log(f"training {len(pending)} of {cfg.folds} folds of {cfg.encoder} at {cfg.size[0]}x{cfg.size[1]}, "
        f"{cfg.epochs} epochs, {cfg.workers_per_fold} worker(s) per fold, {gpus:g} GPU(s) per worker; "
        f"checkpoints under {work}/runs")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=60)
        for ref in ready:
            k = pending.pop(ref)
            try:
                ray.get(ref)
            except Exception as e:
                for other in pending:
                    ray.cancel(other)
                raise RuntimeError(f"fold {k} failed: {e}") from e
            log(f"fold {k}: done ({time.perf_counter() - t0:.0f}s since start, {len(pending)} fold(s) still running)")
        if not ready:
            log(f"... {len(pending)} fold(s) still training ({time.perf_counter() - t0:.0f}s)")

    card = _assemble(out, work, archive, folds, cfg, key, log)
    if not cfg.keep_checkpoints:
        fs, path = io.filesystem(io.join(out, "_train"))
        fs.rm(path, recursive=True)
    log(f"wrote {out} (version {card.version}) in {time.perf_counter() - t0:.0f}s")
    return card


def _assemble(out, work, archive: Archive, folds: np.ndarray, cfg: ClassifierConfig, key: str, log) -> ModelCard:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .folds import FOLDS_FILE, folds_csv

    n, c = archive.labels.shape
    probs = np.full((n, c), np.nan, dtype=np.float32)
    states, fold_info, best_epoch = [], [], {}
    for k in range(cfg.folds):
        done = io.join(work, "done", f"fold-{k}")
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
                          "history": final["history"]})
    if np.isnan(probs).any():
        raise RuntimeError(f"{int(np.isnan(probs).any(axis=1).sum())} images got no out-of-fold prediction")
    auc = metrics.roc_auc(archive.labels, probs)
    names = [f"class {cid}" for cid in archive.class_ids]
    log("\n" + metrics.format_auc_table({f"{cfg.encoder} (OOF, {cfg.folds} folds)": auc}, names,
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
        head={"hidden": cfg.hidden, "dropout": cfg.dropout, "output_stride": cfg.output_stride},
        folds=cfg.folds,
        fold_files=[],
        # The paper's tuned post-processing, until the CAM stage tunes them on OOF maps.
        postprocess={"confidence": 0.5, "threshold": 0.3, "min_seg_len": 0, "tuned": False},
        metrics={"oof_auc": {str(cid): float(a) for cid, a in zip(archive.class_ids, auc)},
                 "oof_auc_mean": float(np.nanmean(auc)), "folds": fold_info},
        training={"run_key": key, "config": cfg.model_dump(mode="json"), "cam2seg_version": __version__},
        data={"archive": archive.root, "source": archive.source, "images": n,
              "image_size": list(archive.image_shape(archive.image_ids[0])),
              "images_per_class": {str(cid): int(s) for cid, s in zip(archive.class_ids, archive.labels.sum(0))}},
    )
    return write_artifact(out, card, states, extra={"oof.parquet": buf.getvalue(),
                                                    FOLDS_FILE: folds_csv(archive.image_ids, folds), **best_epoch})
