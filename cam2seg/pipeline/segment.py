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
"""

from __future__ import annotations

import logging
import hashlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import __version__, io, store
from ..train import state
from ..archive import Archive, ArchiveError
from ..artifact import ModelCard, write_artifact
from ..config import SegmenterConfig
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..train import manifest
from ..train.fold_runner import config_digest, done_url, drop_checkpoints, fit_folds, trained_card
from ..folds import FOLDS_FILE, folds_csv, load_folds, make_folds
from ..models.segmenter import create_segmenter
from ..postprocess import card_default
from ..train.loop import FINAL_FILE, SWA_FILE
from ..truemasks import TrueMasks, read_true_masks

__all__ = ["train_segmenter", "mask_targets", "with_true_masks", "file_digest"]

_log = logging.getLogger(__name__)


def file_digest(url: str) -> str:
    """sha256 of a (small) file's bytes: which corrections file a segmenter learned from."""
    return hashlib.sha256(io.read_bytes(io.absolute(url))).hexdigest()


def with_true_masks(archive: Archive, rows: pa.Table, true_masks: TrueMasks) -> pa.Table:
    """``rows`` (as :func:`mask_targets` returns them) with the images ``true_masks`` covers
    replaced by (or, without a pseudo-mask, added as) their true masks at the image's own size,
    in archive order, and a ``true`` bool column saying which rows hold true masks."""
    cov = pa.array(true_masks.image_ids, pa.string())
    shapes = np.array([archive.image_shape(i) for i in true_masks.image_ids], np.int16).reshape(-1, 2)
    true = pa.table({"image_id": cov, "height": pa.array(shapes[:, 0]), "width": pa.array(shapes[:, 1]),
                     "rles": pa.array([true_masks.rle_row(i, archive.class_ids) for i in true_masks.image_ids],
                                      pa.list_(pa.string()))})
    pseudo = rows.filter(pc.invert(pc.is_in(rows.column("image_id"), value_set=cov)))
    both = pa.concat_tables([pseudo.append_column("true", pa.array(np.zeros(pseudo.num_rows, bool))),
                             true.append_column("true", pa.array(np.ones(true.num_rows, bool)))])
    order = pc.index_in(both.column("image_id"), value_set=pa.array(archive.image_ids, pa.string()))
    return both.take(pc.sort_indices(order))


def mask_targets(archive: Archive, masks: str) -> tuple[pa.Table, dict]:
    """(rows, source description) of the images to train on, in archive order: a table with
    ``image_id``, ``height``, ``width`` (int16, the masks' size) and ``rles`` (list<string>, the
    Kaggle RLE of each archive class, "" for empty). From a store, the pivot is done in Arrow
    (no Python object per row), reading the archive's images only."""
    c = archive.num_classes
    if masks == "truth":
        if not archive.has_masks:
            raise ArchiveError(f"{archive.source} has no masks: --masks truth needs an archive with true masks")
        h, w = archive.image_shape(archive.image_ids[0])
        n = len(archive)
        return pa.table({"image_id": pa.array(archive.image_ids, pa.string()),
                         "height": pa.array(np.full(n, h, np.int16)), "width": pa.array(np.full(n, w, np.int16)),
                         "rles": pa.array([[archive.rle(i, k) for k in archive.class_ids] for i in archive.image_ids],
                                          pa.list_(pa.string()))}), {"masks": "truth"}
    runs = store.committed_runs(masks)
    if not runs:
        raise store.StoreError(f"no committed labeling run in {masks} (label the archive first, or pass --masks truth)")
    table = store.read_masks(masks, columns=["image_id", "class_id", "encoded_pixels", "height", "width",
                                             "model_version"], image_ids=archive.image_ids)
    class_ids = pa.array(archive.class_ids, pa.int8())
    k = pc.index_in(table.column("class_id"), value_set=class_ids)
    if k.null_count:
        bad = pc.unique(table.column("class_id").filter(pc.is_null(k))).to_pylist()
        raise store.StoreError(f"{masks}: class {bad[0]} is not one of the archive's classes {archive.class_ids}")
    held = pa.array(archive.image_ids, pa.string())
    held = held.filter(pc.is_in(held, value_set=pc.unique(table.column("image_id"))))
    n, missing = len(held), len(archive) - len(held)
    if not n:
        raise store.StoreError(f"{masks} holds no pseudo-mask of any image of {archive.source} (was it labeled "
                               f"with the same image ids, i.e. --images {archive.images_url}?)")
    if missing:
        _log.warning(f"warning: {missing} of {len(archive)} archive images have no pseudo-mask in {masks}; "
                     f"training on the other {n}")
    # scatter each row to its (image, class) slot; a slot no row fills stays "" (an empty mask)
    p = pc.index_in(table.column("image_id"), value_set=held).to_numpy()
    slot = p * c + k.to_numpy()
    src = np.full(n * c, table.num_rows, np.int64)
    src[slot] = np.arange(table.num_rows)
    enc = pa.concat_arrays([pc.fill_null(table.column("encoded_pixels"), "").combine_chunks(), pa.array([""])])
    rles = pa.FixedSizeListArray.from_arrays(enc.take(pa.array(src)), c).cast(pa.list_(pa.string()))
    height, width = np.zeros(n, np.int16), np.zeros(n, np.int16)
    height[p], width[p] = table.column("height").to_numpy(), table.column("width").to_numpy()
    versions = pc.unique(table.column("model_version")).to_pylist()
    source = {"masks": masks, "store_runs": [m.run_id for m in runs], "label_model": runs[-1].model,
              "label_model_versions": sorted(versions)}
    return pa.table({"image_id": held, "height": pa.array(height), "width": pa.array(width), "rles": rles}), source


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


def _run_key(cfg: SegmenterConfig, table) -> str:
    """What determines the weights: the config and the manifest's rows (ids, folds, labels,
    masks; not the images' location)."""
    return hashlib.sha256((config_digest(cfg) + manifest.table_digest(table)).encode()).hexdigest()[:12]


def train_segmenter(data_url: str, masks: str, out: str, cfg: SegmenterConfig | None = None, *, force: bool = False,
                    true_masks: str | None = None) -> ModelCard:
    """Train K fold segmenters on the archive at ``data_url`` with ``masks`` ("truth" or a
    label store URL) and write the artifact to ``out`` (model.json, fold-<k>.safetensors,
    folds.csv). ``true_masks``: a masks file (:mod:`cam2seg.truemasks`) whose images train on
    their true masks instead (mixed supervision; with a store only). Returns its card."""
    cfg = cfg or SegmenterConfig()
    out = io.absolute(out)
    masks = masks if masks == "truth" else io.absolute(masks)
    t0 = time.perf_counter()
    archive = Archive.open(data_url)
    c = archive.num_classes
    if true_masks and masks == "truth":
        raise ValueError("--true-masks mixes true masks into pseudo-masks: give a label store as --masks "
                         "(with --masks truth every image already trains on its true mask)")
    # an unknown architecture or encoder fails here, once
    create_segmenter(cfg.architecture, cfg.encoder, c, decoder_channels=cfg.decoder_channels)
    rows, source = mask_targets(archive, masks)
    true = None
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
    table = manifest.manifest_table(ids, [archive.image_url(i) for i in ids], folds, labels, rows.column("rles"),
                                    shapes, true=true, repeat=cfg.true_mask_weight)
    key = _run_key(cfg, table)
    card = trained_card(out, key, force)
    if card is not None:
        return card
    work = io.join(out, "_train", key)
    what = "true masks" if not refine else f"pseudo-masks of {masks}" + (" and true masks" if true is not None else "")
    fit_folds("segmenter", cfg, table, work, k_folds, staged=(SWA_FILE,), t0=t0,
              extra={"num_classes": c, "size": list(size), "refine": refine},
              what=f"fold segmenters ({cfg.architecture}, {cfg.encoder}) on {what} at {size[0]}x{size[1]}")

    states, fold_info = [], []
    for k in range(k_folds):
        done = done_url(work, k)
        states.append(state.load_tensors(io.join(done, SWA_FILE)))
        final = state.read_json(io.join(done, FINAL_FILE))
        fold_info.append({key_: final.get(key_) for key_ in ("fold", "workers", "swa_epochs", "val_loss", "history",
                                                             "ignored_fraction", "ingest", "rows", "peak_rss_mib")})
    card = ModelCard(
        kind="segmenter", architecture=cfg.encoder, num_classes=c, class_ids=archive.class_ids, input_size=size,
        grayscale=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
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
    return card
