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
sizes) and the mask strings of one fold at a time (:class:`FoldMasks`, written by
:func:`cam2seg.train.manifest.write_manifest`); the run key hashes the store's committed runs
(:func:`masks_digest`), not its strings. A rerun that finds its model trained reads no string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Iterator

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

__all__ = ["train_segmenter", "mask_keys", "mask_rles", "rle_chunks", "mask_targets", "with_true_masks", "FoldMasks", "masks_digest",
           "file_digest"]

_log = logging.getLogger(__name__)


def file_digest(url: str) -> str:
    """sha256 of a (small) file's bytes: which corrections file a segmenter learned from."""
    return hashlib.sha256(io.read_bytes(io.absolute(url))).hexdigest()


def with_true_masks(archive: Archive, rows: pa.Table, true_masks: TrueMasks) -> pa.Table:
    """``rows`` (as :func:`mask_keys` or :func:`mask_targets` returns them) with the images
    ``true_masks`` covers replaced by (or, without a pseudo-mask, added as) their true masks at
    the image's own size, in archive order, and a ``true`` bool column saying which rows hold
    true masks. Rows without ``rles`` stay without them (the manifest adds them fold by fold)."""
    cov = pa.array(true_masks.image_ids, pa.string())
    shapes = np.array([archive.image_shape(i) for i in true_masks.image_ids], np.int16).reshape(-1, 2)
    cols = {"image_id": cov, "height": pa.array(shapes[:, 0]), "width": pa.array(shapes[:, 1])}
    if "rles" in rows.column_names:
        cols["rles"] = _true_rles(archive, true_masks, true_masks.image_ids)
    true = pa.table(cols)
    pseudo = rows.filter(pc.invert(pc.is_in(rows.column("image_id"), value_set=cov)))
    both = pa.concat_tables([pseudo.append_column("true", pa.array(np.zeros(pseudo.num_rows, bool))),
                             true.append_column("true", pa.array(np.ones(true.num_rows, bool)))])
    order = pc.index_in(both.column("image_id"), value_set=pa.array(archive.image_ids, pa.string()))
    return both.take(pc.sort_indices(order))


def _true_rles(archive: Archive, true_masks: TrueMasks, ids) -> pa.Array:
    return pa.array([true_masks.rle_row(i, archive.class_ids) for i in ids], pa.list_(pa.string()))


def _store_rows(masks: str, columns: list[str], image_ids, runs, rows=None) -> pa.Table:
    """The newest committed rows of ``image_ids`` (or the store ``rows`` of
    :func:`cam2seg.store.newest_rows`): ``columns`` and the keys, in store order."""
    cols = ["image_id", "class_id", *columns]
    batches = store.iter_masks(masks, cols, image_ids=None if rows is not None else image_ids, runs=runs, rows=rows)
    return pa.Table.from_batches(list(batches), schema=store.MASK_SCHEMA.empty_table().select(cols).schema)


def _class_slots(archive: Archive, masks: str, table: pa.Table) -> np.ndarray:
    """``int[rows]``: each store row's position in the archive's classes; StoreError for a class
    the archive does not have."""
    k = pc.index_in(table.column("class_id"), value_set=pa.array(archive.class_ids, pa.int8()))
    if k.null_count:
        bad = pc.unique(table.column("class_id").filter(pc.is_null(k))).to_pylist()
        raise store.StoreError(f"{masks}: class {bad[0]} is not one of the archive's classes {archive.class_ids}")
    return k.to_numpy()


_PIVOT_IMAGES = 16_384


def mask_keys(archive: Archive, masks: str, runs: list[store.RunMarker] | None = None) -> tuple[pa.Table, dict]:
    """(rows, source description) of the images to train on, in archive order: a table with
    ``image_id``, ``height`` and ``width`` (int16, the masks' size), without the mask strings
    (:func:`mask_rles` reads those, a fold at a time). From a store: one pass over its small
    columns, the archive's images only, the committed ``runs`` given (default: the store's now)."""
    if masks == "truth":
        if not archive.has_masks:
            raise ArchiveError(f"{archive.source} has no masks: --masks truth needs an archive with true masks")
        h, w = archive.image_shape(archive.image_ids[0])
        n = len(archive)
        return pa.table({"image_id": pa.array(archive.image_ids, pa.string()),
                         "height": pa.array(np.full(n, h, np.int16)),
                         "width": pa.array(np.full(n, w, np.int16))}), {"masks": "truth"}
    runs = store.committed_runs(masks) if runs is None else runs
    if not runs:
        raise store.StoreError(f"no committed labeling run in {masks} (label the archive first, or pass --masks truth)")
    table = _store_rows(masks, ["height", "width", "model_version"], archive.image_ids, runs)
    _class_slots(archive, masks, table)
    held = pa.array(archive.image_ids, pa.string())
    held = held.filter(pc.is_in(held, value_set=pc.unique(table.column("image_id"))))
    n, missing = len(held), len(archive) - len(held)
    if not n:
        raise store.StoreError(f"{masks} holds no pseudo-mask of any image of {archive.source} (was it labeled "
                               f"with the same image ids, i.e. --images {archive.images_url}?)")
    if missing:
        _log.warning(f"warning: {missing} of {len(archive)} archive images have no pseudo-mask in {masks}; "
                     f"training on the other {n}")
    p = pc.index_in(table.column("image_id"), value_set=held).to_numpy()
    height, width = np.zeros(n, np.int16), np.zeros(n, np.int16)
    height[p], width[p] = table.column("height").to_numpy(), table.column("width").to_numpy()
    versions = pc.unique(table.column("model_version")).to_pylist()
    source = {"masks": masks, "store_runs": [m.run_id for m in runs], "label_model": runs[-1].model,
              "label_model_versions": sorted(versions)}
    return pa.table({"image_id": held, "height": pa.array(height), "width": pa.array(width)}), source


def rle_chunks(archive: Archive, masks: str, image_ids, runs: list[store.RunMarker] | None = None,
               keys: pa.Table | None = None) -> Iterator[pa.Array]:
    """list<string> arrays of at most ``_PIVOT_IMAGES`` images each, which laid end to end are
    ``[len(image_ids)][C]``: the Kaggle RLE of each archive class of each image (in
    ``image_ids``' order; "" for an empty mask or a class the store has no row of), from the
    archive's true masks (``masks="truth"``) or the store's newest committed rows of those
    images: ``keys``, their rows in :func:`cam2seg.store.newest_rows` (computed here when None).
    The pivot is done in Arrow (no Python object per row); the images' strings are read once,
    and each chunk is gathered only when asked for, so a caller that writes each chunk before
    asking for the next holds them once."""
    c = archive.num_classes
    ids = store.id_array(image_ids)
    if masks == "truth":
        for a in range(0, len(ids), _PIVOT_IMAGES):
            yield pa.array([[archive.rle(i, k) for k in archive.class_ids]
                            for i in ids.slice(a, _PIVOT_IMAGES).to_pylist()], pa.list_(pa.string()))
        return
    table = _store_rows(masks, ["encoded_pixels"], ids, runs, None if keys is None else keys.column("row"))
    # each row's (image, class) slot; a slot no row fills stays "" (an empty mask)
    slot = pc.index_in(table.column("image_id"), value_set=ids).to_numpy() * c + _class_slots(archive, masks, table)
    src = np.full(len(ids) * c, -1, np.int64)
    src[slot] = np.arange(table.num_rows)
    enc = table.column("encoded_pixels")
    del table
    # Gathered _PIVOT_IMAGES images at a time: one string array holds at most 2 GiB, which one
    # fold's strings pass at about 670,000 images of Severstal's geometry (3.2 KB of RLE per image,
    # bench/scale.py), and a gather of a whole fold at once would copy them all once more.
    for a in range(0, len(src), _PIVOT_IMAGES * c):
        part = src[a : a + _PIVOT_IMAGES * c]
        got = enc.take(pa.array(part, mask=part < 0))
        strings = pc.fill_null(got.combine_chunks() if isinstance(got, pa.ChunkedArray) else got, "")
        yield pa.FixedSizeListArray.from_arrays(strings, c).cast(pa.list_(pa.string()))


def mask_rles(archive: Archive, masks: str, image_ids, runs: list[store.RunMarker] | None = None) -> pa.ChunkedArray:
    """:func:`rle_chunks` as one chunked list<string> array ``[len(image_ids)][C]``."""
    return pa.chunked_array(list(rle_chunks(archive, masks, image_ids, runs)), pa.list_(pa.string()))


def mask_targets(archive: Archive, masks: str) -> tuple[pa.Table, dict]:
    """:func:`mask_keys`' rows with ``rles`` (:func:`mask_rles`) for every image at once: for
    small stores and tests (training adds the strings fold by fold, :class:`FoldMasks`)."""
    runs = None if masks == "truth" else store.committed_runs(masks)
    rows, source = mask_keys(archive, masks, runs)
    return rows.append_column("rles", mask_rles(archive, masks, rows.column("image_id"), runs)), source


class FoldMasks:
    """:func:`cam2seg.train.manifest.write_manifest`'s ``fill`` for the segmenter: one fold's
    manifest rows -> those rows with ``rles``, in pieces of at most ``_PIVOT_IMAGES`` rows: true
    masks for the rows whose ``true`` is set (mixed supervision), the masks of ``masks`` (the
    pinned store ``runs``) for the others. Memory: the store's newest-row keys (read on the
    first fold, kept for the others: :func:`cam2seg.store.newest_rows`), one fold's strings
    and one piece."""

    def __init__(self, archive: Archive, masks: str, runs: list[store.RunMarker] | None,
                 true_masks: TrueMasks | None = None):
        self.archive, self.masks, self.runs, self.true_masks = archive, masks, runs, true_masks
        self._keys = None

    def __call__(self, rows: pa.Table) -> Iterator[pa.Table]:
        ids = rows.column("image_id").combine_chunks()
        keys = None
        if self.masks != "truth":
            if self._keys is None:
                self._keys = store.newest_rows(self.masks, self.runs)
            keys = self._keys.filter(pc.is_in(self._keys.column("image_id"), value_set=ids))
        true = None
        if self.true_masks is not None and "true" in rows.column_names:
            true = rows.column("true").to_numpy(zero_copy_only=False)
        at = 0
        for chunk in rle_chunks(self.archive, self.masks, ids, self.runs, keys):
            n = len(chunk)
            here = np.array([], np.int64) if true is None else np.flatnonzero(true[at : at + n])
            if len(here):
                # the few true-mask rows replace theirs (a true-only image has "" here)
                values = chunk.to_pylist()
                for j, row in zip(here, _true_rles(self.archive, self.true_masks,
                                                   ids.take(pa.array(here + at)).to_pylist()).to_pylist()):
                    values[j] = row
                chunk = pa.array(values, pa.list_(pa.string()))
            yield manifest.with_rles(rows.slice(at, n), chunk)
            at += n


def masks_digest(archive: Archive, masks: str, runs: list[store.RunMarker] | None,
                 true_masks: TrueMasks | None = None) -> str:
    """A hash of what the masks are, without reading the store's mask strings: its committed
    runs' mask parts in run order (files and row counts; a part is never rewritten, so these name
    its rows), or the archive's true mask strings; with the true-masks file's bytes. A commit
    with new rows changes it, also one for other images (a changed store retrains); a run that
    wrote no row does not."""
    h = hashlib.sha256()
    if masks == "truth":
        for i in archive.image_ids:
            h.update("\t".join([i, *(archive.rle(i, k) for k in archive.class_ids)]).encode() + b"\n")
    else:
        # a run without mask parts (a rerun that found everything labeled) changes no row
        h.update(json.dumps([[[p.file, p.rows] for p in m.parts.masks] for m in runs or [] if m.parts.masks]).encode())
    if true_masks is not None:
        h.update(file_digest(true_masks.source).encode())
    return h.hexdigest()


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
    # the runs are read once: the run key and the manifest's strings come from the same runs,
    # also while a labeling job commits more
    runs = None if masks == "truth" else store.committed_runs(masks)
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
    key = _run_key(cfg, table, masks_digest(archive, masks, runs, tm))
    card = trained_card(out, key, force)
    if card is not None:
        return card
    work = io.join(out, "_train", key)
    what = "true masks" if not refine else f"pseudo-masks of {masks}" + (" and true masks" if true is not None else "")
    fit_folds("segmenter", cfg, table, work, k_folds, staged=(SWA_FILE,), t0=t0,
              extra={"num_classes": c, "size": list(size), "refine": refine},
              what=f"fold segmenters ({cfg.architecture}, {cfg.encoder}) on {what} at {size[0]}x{size[1]}",
              fill=FoldMasks(archive, masks, runs, tm))

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
