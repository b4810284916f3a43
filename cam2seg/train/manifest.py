"""A training run's manifest: one row per image, as fold-partitioned Parquet in the run's folder.

The driver builds it once per run (:func:`manifest_table`, :func:`write_manifest`); each fold's
workers read their own rows (:func:`read_fold`). A fold's loop config therefore carries the
manifest's URL and the fold number, and nothing per image, whatever the archive's size.

The segmenter's mask strings are the bulk of a manifest (about 3 GiB at a million images), so the
driver need not hold them all: it builds the table without ``rles`` and gives
:func:`write_manifest` a ``fill`` that adds them to one fold's rows at a time
(:func:`cam2seg.pipeline.segment.train_segmenter` reads them from the label store fold by fold).

Columns (:data:`BASE_SCHEMA`, and :data:`MASK_COLUMNS` for the segmenter):

* ``index`` int32 (the image's position in the run's image list: training rows are read in this
  order, so a fold sees its images in the same order whatever the partitioning),
  ``image_id`` string, ``uri`` string (the image's fsspec URL), ``fold`` int8;
* ``labels`` list<uint8>, the image-level label per class (the archive's class order);
* ``height``, ``width`` int16 and ``rles`` list<string> (Kaggle RLE per class at
  ``(height, width)``, "" for an empty mask), for the segmenter;
* with mixed supervision (:data:`MIXED_COLUMNS`): ``true`` bool (the row's masks are true masks,
  used as they are, not pseudo-masks to refine) and ``repeat`` uint8 (how many times the row is
  a training row per epoch, :func:`training_rows`; validation reads each row once).

Layout: ``<url>/fold=<k>/part-0.parquet`` for every fold k, then ``<url>/_complete``. A
manifest without ``_complete`` (a driver killed while writing it) is rewritten.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import io

__all__ = ["BASE_SCHEMA", "MASK_COLUMNS", "MIXED_COLUMNS", "manifest_table", "write_manifest", "read_fold", "fold_rows",
           "fold_url", "table_digest", "training_rows", "training_count", "with_rles"]

BASE_SCHEMA = pa.schema([("index", pa.int32()), ("image_id", pa.string()), ("uri", pa.string()), ("fold", pa.int8()),
                         ("labels", pa.list_(pa.uint8()))])
MASK_COLUMNS = [("height", pa.int16()), ("width", pa.int16()), ("rles", pa.list_(pa.string()))]
MIXED_COLUMNS = [("true", pa.bool_()), ("repeat", pa.uint8())]
_COMPLETE = "_complete"
#: rows per Parquet row group: a streamed fold is read, shuffled and decoded in blocks of this
#: many rows, which at 256x1600 decode to 128 MiB (Ray Data's target block size); at 512 a block
#: held 1 GiB there, and a streamed worker's buffers grew with the block (BENCHMARKS.md)
_ROW_GROUP = 64


def manifest_table(ids, uris, folds, labels: np.ndarray, rles=None, shapes=None, true=None, repeat: int = 1) -> pa.Table:
    """The manifest as one table: ``ids`` / ``uris`` ``[N]``, ``folds`` ``int[N]``, ``labels``
    ``uint8[N, C]``; ``shapes`` ``[N]`` (height, width) with ``rles`` (``[N][C]`` strings, or a
    list<string> Arrow array) for the segmenter (both None for the classifier; ``rles`` None: the
    table without them, for a ``fill`` of :func:`write_manifest` to add fold by fold); ``true``
    (``bool[N]``, mixed supervision: which rows hold true masks) with ``repeat``, the training
    repeats of a true-mask row (pseudo-mask rows: 1)."""
    labels = np.asarray(labels, np.uint8)
    cols = {"index": pa.array(np.arange(len(labels), dtype=np.int32)), "image_id": pa.array(list(ids), pa.string()),
            "uri": pa.array(list(uris), pa.string()), "fold": pa.array(np.asarray(folds, np.int8)),
            "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels.ravel(), pa.uint8()),
                                                        labels.shape[1]).cast(pa.list_(pa.uint8()))}
    schema = BASE_SCHEMA
    if shapes is not None:
        shapes = np.asarray(shapes, np.int16).reshape(-1, 2)
        cols.update({"height": pa.array(shapes[:, 0]), "width": pa.array(shapes[:, 1])})
        schema = pa.schema([*BASE_SCHEMA, *MASK_COLUMNS])
        if rles is None:
            schema = schema.remove(schema.get_field_index("rles"))
        else:
            if not isinstance(rles, (pa.Array, pa.ChunkedArray)):
                rles = pa.array([list(r) for r in rles], pa.list_(pa.string()))
            cols["rles"] = rles
        if true is not None:
            true = np.asarray(true, bool)
            cols.update({"true": pa.array(true), "repeat": pa.array(np.where(true, repeat, 1).astype(np.uint8))})
            schema = pa.schema([*schema, *MIXED_COLUMNS])
    return pa.table(cols, schema=schema)


def training_rows(rows: pa.Table) -> pa.Table:
    """``rows`` with each row repeated ``repeat`` times when the manifest has that column (copies
    next to their original; the loop shuffles), else ``rows``."""
    if "repeat" not in rows.column_names:
        return rows
    times = rows.column("repeat").to_numpy().astype(np.int64)
    return rows if (times == 1).all() else rows.take(pa.array(np.repeat(np.arange(rows.num_rows), times)))


def training_count(table: pa.Table, mask: np.ndarray) -> int:
    """Training rows per epoch of the manifest rows selected by ``bool[N]`` ``mask``."""
    if "repeat" not in table.column_names:
        return int(mask.sum())
    return int(table.column("repeat").to_numpy()[mask].astype(np.int64).sum())


def table_digest(table: pa.Table, exclude=("uri",)) -> str:
    """A content hash of a manifest table for run keys, batch by batch (Arrow IPC bytes);
    ``exclude``: columns that do not change what is learned (by default the images' location,
    so a moved archive keeps its run key)."""
    table = table.drop_columns([c for c in exclude if c in table.column_names])
    h = hashlib.sha256(str(table.schema).encode())
    for batch in table.combine_chunks().to_batches(max_chunksize=65_536):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def with_rles(rows: pa.Table, rles: pa.Array) -> pa.Table:
    """Segmenter manifest ``rows`` built without mask strings, with ``rles`` (list<string>,
    one entry per row, in row order) in its place after ``width``."""
    return rows.add_column(rows.schema.get_field_index("width") + 1, pa.field("rles", pa.list_(pa.string())), rles)


def write_manifest(url: str, table: pa.Table,
                   fill: Callable[[pa.Table], Iterable[pa.Table]] | None = None) -> str:
    """Write ``table`` under ``url`` as one Parquet file per fold (unless a complete manifest is
    there already: the run key names the folder, so same key, same rows); returns ``url``.
    ``fill``: one fold's rows -> those rows, in pieces laid end to end, with the columns ``table``
    leaves out (the segmenter's ``rles``, :func:`with_rles`). It is called once per fold and each
    piece is written before the next is asked for, so the mask strings in memory are one fold's
    at most (:class:`cam2seg.pipeline.segment.FoldMasks` holds one piece of them)."""
    if io.exists(io.join(url, _COMPLETE)):
        return url
    folds = table.column("fold").to_numpy()
    for k in np.unique(folds):
        part = table.filter(pc.equal(table.column("fold"), pa.scalar(int(k), pa.int8())))
        pieces = [part] if fill is None else fill(part)
        # Streamed to the file, not built in memory first: a fold of a large segmenter run holds
        # hundreds of MB of mask strings. A file cut short by a kill is never read: _complete comes last.
        fs, path = io.filesystem(fold_url(url, int(k)))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            writer = None
            for piece in pieces:
                if writer is None:
                    writer = pq.ParquetWriter(f, piece.schema, compression="zstd")
                # Row groups of _ROW_GROUP rows: Ray Data reads and shuffles a streamed fold in
                # blocks of that size (the pieces are whole multiples of it but for the last).
                writer.write_table(piece, row_group_size=_ROW_GROUP)
            if writer is None:
                raise ValueError(f"fold {k}: the manifest's fill returned no rows")
            writer.close()
        del part, pieces
    io.write_bytes(io.join(url, _COMPLETE), b"")
    return url


def fold_url(url: str, fold: int) -> str:
    """The Parquet file of one fold of the manifest at ``url``."""
    return io.join(url, f"fold={int(fold)}", "part-0.parquet")


def fold_rows(url: str, fold: int) -> pa.Table:
    """The manifest rows of one fold."""
    fs, path = io.filesystem(fold_url(url, fold))
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def read_fold(url: str, fold: int, folds: int) -> tuple[pa.Table, pa.Table]:
    """(training rows: every other fold, validation rows: ``fold``) of a ``folds``-fold manifest."""
    train = pa.concat_tables([fold_rows(url, k) for k in range(folds) if k != fold]).sort_by("index")
    return train, fold_rows(url, fold)
