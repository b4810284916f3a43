"""The segmenter manifest's mask strings: an archive's true masks, or a label store's newest
committed rows, pivoted to one row per image (``list<string>[C]``: the Kaggle RLE of each archive
class, "" for an empty mask or a class the store has no row of).

At a million images of Severstal's geometry these strings are about 3.2 GiB (bench/scale.py), so
the driver never holds them all:

* :func:`mask_keys`: which images train and their mask sizes, from one pass over the store's
  small columns;
* :func:`masks_digest`: what the strings are, for the run key, from the list of the runs' parts;
* :class:`FoldMasks`: :func:`cam2seg.train.manifest.write_manifest`'s ``fill``. One pass over
  the store's strings writes them, each with its image's position and class, into one local
  Parquet file per fold; each fold is then pivoted from its own file, a piece at a time;
* :func:`mask_targets`: every image's strings at once, for small stores and tests.

A store is read at the committed runs the caller read once (``runs``), so a labeling job that
commits meanwhile changes neither the run key nor the manifest. Mixed supervision
(:func:`with_true_masks`): the images a masks file covers take its true masks instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import io, store
from ..archive import Archive, ArchiveError
from ..truemasks import TrueMasks
from . import manifest

__all__ = ["mask_keys", "rle_chunks", "mask_targets", "with_true_masks", "FoldMasks", "masks_digest", "file_digest"]

_log = logging.getLogger(__name__)

#: images per pivoted piece: a string array holds at most 2 GiB, which one fold's strings pass at
#: about 670,000 images of Severstal's geometry (3.2 KB of RLE per image), and a piece is copied
#: once more as it is written
_PIVOT_IMAGES = 16_384


def file_digest(url: str) -> str:
    """sha256 of a (small) file's bytes: which corrections file a segmenter learned from."""
    return hashlib.sha256(io.read_bytes(io.absolute(url))).hexdigest()


def _store_rows(masks: str, columns: list[str], image_ids, runs) -> pa.Table:
    """The newest committed rows of ``image_ids`` in the store's ``runs``: ``columns`` and the
    keys, in store order."""
    cols = ["image_id", "class_id", *columns]
    batches = store.iter_masks(masks, cols, image_ids=image_ids, runs=runs)
    return pa.Table.from_batches(list(batches), schema=store.MASK_SCHEMA.empty_table().select(cols).schema)


def _class_slots(archive: Archive, masks: str, class_ids) -> np.ndarray:
    """``int8[rows]``: each store row's position in the archive's classes; StoreError for a class
    the archive does not have."""
    k = pc.index_in(class_ids, value_set=pa.array(archive.class_ids, pa.int8()))
    if k.null_count:
        bad = pc.unique(pc.filter(class_ids, pc.is_null(k))).to_pylist()
        raise store.StoreError(f"{masks}: class {bad[0]} is not one of the archive's classes {archive.class_ids}")
    return k.to_numpy().astype(np.int8)


def mask_keys(archive: Archive, masks: str, runs: list[store.RunMarker] | None = None) -> tuple[pa.Table, dict]:
    """(rows, source description) of the images to train on, in archive order: a table with
    ``image_id``, ``height`` and ``width`` (int16, the masks' size), without the mask strings.
    From a store: one pass over its small columns, the archive's images only, at the committed
    ``runs`` given (default: the store's now)."""
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
    _class_slots(archive, masks, table.column("class_id"))
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


def _pivot(n: int, c: int, pos: np.ndarray, slot: np.ndarray, strings) -> Iterator[pa.Array]:
    """list<string> arrays of at most ``_PIVOT_IMAGES`` images each, laid end to end
    ``[n][c]``: row ``j`` of ``strings`` (a string array, chunked or not) goes to image
    ``pos[j]`` (in 0..n-1), class slot ``slot[j]``; a slot no row fills is ""."""
    src = np.full(n * c, -1, np.int64)
    src[np.asarray(pos, np.int64) * c + slot] = np.arange(len(pos))
    # large_string: the strings of many images pass a string array's 2 GiB of offsets together
    enc = strings.cast(pa.large_string())
    del strings
    enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
    for a in range(0, n * c, _PIVOT_IMAGES * c):
        part = src[a : a + _PIVOT_IMAGES * c]
        got = pc.fill_null(enc.take(pa.array(part, mask=part < 0)), "").cast(pa.string())
        yield pa.FixedSizeListArray.from_arrays(got, c).cast(pa.list_(pa.string()))


def _truth_chunks(archive: Archive, ids: pa.Array) -> Iterator[pa.Array]:
    for a in range(0, len(ids), _PIVOT_IMAGES):
        yield pa.array([[archive.rle(i, k) for k in archive.class_ids] for i in ids.slice(a, _PIVOT_IMAGES).to_pylist()],
                       pa.list_(pa.string()))


def rle_chunks(archive: Archive, masks: str, image_ids, runs: list[store.RunMarker] | None = None) -> Iterator[pa.Array]:
    """list<string> arrays of at most ``_PIVOT_IMAGES`` images each, which laid end to end are
    ``[len(image_ids)][C]`` in ``image_ids``' order: the archive's true masks (``masks="truth"``)
    or the store's newest committed rows of those images (read here at once: for one fold's or a
    small store's images; :class:`FoldMasks` reads a large store once for every fold)."""
    ids = store.id_array(image_ids)
    if masks == "truth":
        yield from _truth_chunks(archive, ids)
        return
    table = _store_rows(masks, ["encoded_pixels"], ids, runs)
    pos = pc.index_in(table.column("image_id"), value_set=ids).to_numpy()
    yield from _pivot(len(ids), archive.num_classes, pos, _class_slots(archive, masks, table.column("class_id")),
                      table.column("encoded_pixels"))


def mask_targets(archive: Archive, masks: str) -> tuple[pa.Table, dict]:
    """:func:`mask_keys`' rows with ``rles`` (list<string> ``[N][C]``) for every image at once:
    for small stores and tests (training adds the strings fold by fold, :class:`FoldMasks`)."""
    runs = None if masks == "truth" else store.committed_runs(masks)
    rows, source = mask_keys(archive, masks, runs)
    rles = pa.chunked_array(list(rle_chunks(archive, masks, rows.column("image_id"), runs)), pa.list_(pa.string()))
    return rows.append_column("rles", rles), source


def _true_rles(archive: Archive, true_masks: TrueMasks, ids) -> pa.Array:
    return pa.array([true_masks.rle_row(i, archive.class_ids) for i in ids], pa.list_(pa.string()))


def with_true_masks(archive: Archive, rows: pa.Table, true_masks: TrueMasks) -> pa.Table:
    """``rows`` (as :func:`mask_keys` or :func:`mask_targets` returns them) with the images
    ``true_masks`` covers replaced by (or, without a pseudo-mask, added as) their true masks at
    the image's own size, in archive order, and a ``true`` bool column saying which rows hold
    true masks. Rows without ``rles`` stay without them (:class:`FoldMasks` adds them)."""
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


_SPILL_SCHEMA = pa.schema([("at", pa.int32()), ("slot", pa.int8()), ("encoded_pixels", pa.string())])


class FoldMasks:
    """:func:`cam2seg.train.manifest.write_manifest`'s ``fill`` for the segmenter's ``table``
    (:func:`cam2seg.train.manifest.manifest_table` without ``rles``): one fold's rows -> those
    rows with ``rles``, in pieces of at most ``_PIVOT_IMAGES`` rows. True masks for the rows
    whose ``true`` is set (mixed supervision), else the masks of ``masks`` at the pinned store
    ``runs``.

    From a store, the first fold asked for reads every fold's strings in one pass (the newest
    row of each (image, class), in store order) and writes each string, with its image's place
    and its class slot, to a local Parquet file per piece of a fold; each piece is then pivoted
    from its own file. So the store is read once, not once per fold, and memory holds the
    store's keys during the pass and one piece's strings after it. The temporary folder is
    removed once every fold was served (or when this object is collected); it holds the strings
    once, uncompressed: about 3 GiB at a million images of Severstal's geometry
    (bench/scale.py)."""

    def __init__(self, archive: Archive, masks: str, runs: list[store.RunMarker] | None, table: pa.Table,
                 true_masks: TrueMasks | None = None):
        self.archive, self.masks, self.runs, self.true_masks = archive, masks, runs, true_masks
        self.ids = table.column("image_id").combine_chunks()
        self.folds = table.column("fold").to_numpy()
        self.k_folds = int(self.folds.max()) + 1 if len(self.folds) else 0
        # each row's place within its own fold (a fold's manifest rows keep table order)
        self.within = np.zeros(len(self.folds), np.int64)
        for k in range(self.k_folds):
            at = np.flatnonzero(self.folds == k)
            self.within[at] = np.arange(len(at))
        self._spill, self._served = None, set()

    def _spill_store(self) -> None:
        """One pass over the store's strings, each to its (fold, piece)'s file."""
        self._spill = tempfile.TemporaryDirectory(prefix="cam2seg-masks-")
        keys = store.newest_rows(self.masks, self.runs, self.ids).sort_by("row")
        # iter_masks yields the kept rows in store order, i.e. in ``row`` order: keys line up
        pos = pc.index_in(keys.column("image_id"), value_set=self.ids).to_numpy()
        slot = _class_slots(self.archive, self.masks, keys.column("class_id"))
        at = self.within[pos]
        bucket = self.folds[pos].astype(np.int64) * (len(self.ids) // _PIVOT_IMAGES + 1) + at // _PIVOT_IMAGES
        at = (at % _PIVOT_IMAGES).astype(np.int32)
        del pos
        writers, done = {}, 0
        try:
            for batch in store.iter_masks(self.masks, ["encoded_pixels"], runs=self.runs, rows=keys.column("row")):
                n = batch.num_rows
                b = bucket[done : done + n]
                order = np.argsort(b, kind="stable")
                cuts = np.flatnonzero(np.diff(b[order])) + 1
                part = pa.table({"at": at[done : done + n], "slot": slot[done : done + n],
                                 "encoded_pixels": batch.column("encoded_pixels")}, schema=_SPILL_SCHEMA).take(order)
                for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
                    key = int(b[order[lo]])
                    if key not in writers:
                        # Uncompressed and without dictionaries: a local file read once, where
                        # zstd would take longer to write than the rest of the pass (bench/scale.py)
                        writers[key] = pq.ParquetWriter(self._file(key), _SPILL_SCHEMA, compression="none",
                                                        use_dictionary=False)
                    writers[key].write_table(part.slice(lo, hi - lo))
                done += n
        finally:
            for w in writers.values():
                w.close()
        if done != keys.num_rows:  # a part changed under us (parts are never rewritten)
            raise store.StoreError(f"{self.masks}: read {done} mask rows where the runs' keys list {keys.num_rows}")

    def _file(self, bucket: int) -> str:
        return os.path.join(self._spill.name, f"{bucket}.parquet")

    def _chunks(self, k: int, ids: pa.Array) -> Iterator[pa.Array]:
        if self.masks == "truth":
            yield from _truth_chunks(self.archive, ids)
            return
        if self._spill is None:
            self._spill_store()
        for p, lo in enumerate(range(0, len(ids), _PIVOT_IMAGES)):
            path = self._file(k * (len(self.ids) // _PIVOT_IMAGES + 1) + p)
            t = pq.read_table(path) if os.path.exists(path) else _SPILL_SCHEMA.empty_table()  # no store row
            yield from _pivot(min(_PIVOT_IMAGES, len(ids) - lo), self.archive.num_classes, t.column("at").to_numpy(),
                              t.column("slot").to_numpy(), t.column("encoded_pixels"))

    def __call__(self, rows: pa.Table) -> Iterator[pa.Table]:
        ids = rows.column("image_id").combine_chunks()
        k = int(rows.column("fold")[0].as_py())
        if int(pc.max(rows.column("fold")).as_py()) != k or len(ids) != int((self.folds == k).sum()):
            raise ValueError("FoldMasks takes one whole fold's manifest rows at a time")
        true = None
        if self.true_masks is not None and "true" in rows.column_names:
            true = rows.column("true").to_numpy(zero_copy_only=False)
        at = 0
        for chunk in self._chunks(k, ids):
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
        self._served.add(k)
        if self._spill is not None and len(self._served) == self.k_folds:
            self._spill.cleanup()
            self._spill = None


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
