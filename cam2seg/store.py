"""The label store: Parquet RLE masks in committed runs (README.md, "Stage 2 at scale").

Layout under ``<store>``::

    masks/run=<run_id>/part-<uuid>.parquet     one row per (image, class), empty masks too
    errors/run=<run_id>/part-<uuid>.parquet    images that could not be labeled, with a reason
    _runs/<run_id>.json                        the commit marker: which parts count
    _lock.json                                 the lease of the run writing now

Parts are written first and count only once a marker lists them; the marker is one PUT (an
atomic rename locally), rewritten as a long run commits more parts and marked ``complete``
at the end. Readers trust markers only, so a crashed run shows exactly what it committed
and nothing half-written; the next run (holding the lease) deletes unlisted parts. Ray's own
``write_parquet`` is not used for this reason: it is not atomic (ray#55043).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import io, rle
from .classes import check_same, default_names

__all__ = ["MASK_SCHEMA", "ERROR_SCHEMA", "StoreError", "StoreBusy", "Part", "Parts", "RunMarker", "RunWriter",
           "new_run_id", "write_part", "commit",
           "committed_runs", "read_masks", "read_errors", "labeled_ids", "decode_mask", "Lease",
           "remove_uncommitted", "read_parts", "iter_masks", "newest_rows", "id_array", "now"]

MASK_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("class_id", pa.int8()), ("encoded_pixels", pa.string()),
    ("score", pa.float32()), ("area", pa.int32()), ("height", pa.int16()), ("width", pa.int16()),
    ("model_version", pa.string()), ("run_id", pa.string()),
])
ERROR_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("error", pa.string()),
                          ("run_id", pa.string())])
RUNS = "_runs"
LOCK = "_lock.json"


class StoreError(RuntimeError):
    """A label store that cannot be read or written as asked."""


class StoreBusy(StoreError):
    """Another run holds the store's lease."""


class Part(BaseModel):
    """One committed Parquet part: its path under the store and its row count."""

    model_config = ConfigDict(extra="forbid")

    file: str
    rows: int = Field(ge=0)


class Parts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    masks: list[Part] = []
    errors: list[Part] = []


class RunMarker(BaseModel):
    """A run's commit marker (``_runs/<run_id>.json``): which parts count, and what made them.

    ``incremental``: False, True (skip images this model version labeled) or "new-only" (skip
    images any model labeled, the nightly rule). ``positives``: images with a non-empty mask per
    class, in the model's class order, once ``complete``. ``labels``: the image-level labels that
    gated the run (classes they call absent were written empty); ``label_gated``: how many of
    the listed images they covered. ``model_version`` of a composed run is
    ``<classifier version>+<segmenter version>``.
    """

    model_config = ConfigDict(extra="forbid")

    run_id: str
    model: str | None = None
    model_kind: Literal["classifier", "segmenter", "composed"] = "classifier"
    model_version: str | None = None
    images: str | None = None
    listed: int = 0
    to_do: int = 0
    labeled: int = 0
    errors: int = 0
    start: str | None = None
    end: str | None = None
    committed_at: str | None = None
    complete: bool = False
    incremental: bool | Literal["new-only"] = False
    config: dict[str, Any] = {}
    parts: Parts = Parts()
    positives: list[int] | None = None
    labels: str | None = None
    label_gated: int = 0
    #: the model's class names in class id order (None on markers from before names)
    class_names: list[str] | None = None
    #: model_kind "composed": the segmenter that drew the shapes (``model`` gated them) and the
    #: setting (:class:`cam2seg.models.compose.Composition`)
    segmenter: str | None = None
    composition: dict[str, Any] | None = None

    @property
    def names(self) -> list[str] | None:
        """The run's class names; from its class ids for older markers; None when neither is known."""
        if self.class_names is not None:
            return list(self.class_names)
        ids = self.config.get("class_ids")
        return default_names(ids) if ids else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    """Sortable by start time, unique across hosts: ``20261125T031500123Z-1a2b3c4d``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")[:-4] + "Z-" + uuid.uuid4().hex[:8]


def write_part(store: str, kind: str, run_id: str, table: pa.Table) -> dict:
    """Write one Parquet part of ``kind`` ("masks" or "errors"); returns its manifest entry
    ``{"file": relative path, "rows": n}``. The part is invisible until committed."""
    if kind not in ("masks", "errors"):
        raise ValueError(f"kind must be masks or errors, got {kind!r}")
    rel = f"{kind}/run={run_id}/part-{uuid.uuid4().hex}.parquet"
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    io.write_bytes(io.join(store, rel), buf.getvalue().to_pybytes())
    return {"file": rel, "rows": table.num_rows}


def commit(store: str, run_id: str, marker: RunMarker | dict) -> RunMarker:
    """Write (or rewrite) the run's marker; its ``parts`` are the committed parts. A dict is
    validated as a :class:`RunMarker` first."""
    fields = marker.model_dump() if isinstance(marker, RunMarker) else dict(marker)
    marker = RunMarker.model_validate({**fields, "run_id": run_id, "committed_at": now()})
    io.write_bytes(io.join(store, RUNS, f"{run_id}.json"), marker.model_dump_json(indent=1).encode())
    return marker


def check_classes(store: str, names: list[str], what: str, runs: list[RunMarker] | None = None) -> None:
    """Refuse (:class:`cam2seg.classes.ClassMismatch`) when a committed run of ``store`` holds other
    classes than ``names`` (of ``what``: the model that labels, or the archive a segmenter
    trains on), naming both lists."""
    for marker in committed_runs(store) if runs is None else runs:
        if marker.names is not None:
            check_same(names, what, marker.names, f"the label store {store} (run {marker.run_id})")


def committed_runs(store: str) -> list[RunMarker]:
    """Markers of the store, oldest first (by run id, which starts with the start time)."""
    fs, root = io.filesystem(io.join(store, RUNS), fresh=True)
    runs_dir = root.rstrip("/")
    if not fs.exists(runs_dir):
        return []
    markers = []
    for path in sorted(fs.ls(runs_dir, detail=False)):
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.startswith("."):
            try:
                markers.append(RunMarker.model_validate(json.loads(fs.cat_file(path))))
            except ValidationError as e:
                err = e.errors()[0]
                raise StoreError(f"{store}: commit marker {name} is not a cam2seg marker: "
                                 f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
            except ValueError as e:
                raise StoreError(f"{store}: unreadable commit marker {name}: {e}") from None
    return sorted(markers, key=lambda m: m.run_id)


@contextlib.contextmanager
def _part_file(store: str, part: Part) -> Iterator[pq.ParquetFile]:
    """The committed part as an open ``ParquetFile`` whose row count matches its marker; the
    file (an S3 connection, on object storage) is closed on leaving the ``with``."""
    fs, path = io.filesystem(io.join(store, part.file))
    with fs.open(path, "rb") as handle:
        f = pq.ParquetFile(handle)
        if f.metadata.num_rows != part.rows:
            raise StoreError(f"{store}/{part.file}: {f.metadata.num_rows} rows, its marker says {part.rows}")
        yield f


def read_parts(store: str, markers: list[RunMarker], kind: str, schema: pa.Schema, columns=None) -> pa.Table:
    """All rows of ``kind`` the ``markers`` list, with ``_rank`` = the marker's position."""
    tables = []
    for rank, m in enumerate(markers):
        for part in getattr(m.parts, kind):
            with _part_file(store, part) as f:
                t = f.read(columns=columns)
            tables.append(t.append_column("_rank", pa.array(np.full(t.num_rows, rank, np.int32))))
    if not tables:
        cols = [schema.field(c) for c in (columns or schema.names)]
        return pa.schema([*cols, ("_rank", pa.int32())]).empty_table()
    return pa.concat_tables(tables)


def _newest_ranks(table: pa.Table, keys: list[str]) -> pa.Table | None:
    """``keys`` + ``_rank``: the newest run's rank per key, or None when one run holds every row
    (nothing is superseded). Hash aggregation in Arrow: no per-row Python objects."""
    if table.num_rows == 0:
        return None
    lo_hi = pc.min_max(table.column("_rank")).as_py()
    if lo_hi["min"] == lo_hi["max"]:
        return None
    newest = table.select([*keys, "_rank"]).group_by(keys).aggregate([("_rank", "max")])
    return newest.select([*keys, "_rank_max"]).rename_columns([*keys, "_rank"])


def _newest(table: pa.Table, keys: list[str]) -> pa.Table:
    """Keep, per key, the row of the newest run (highest ``_rank``); drop ``_rank``. Order is not kept."""
    newest = _newest_ranks(table, keys)
    if newest is not None:
        table = table.join(newest, keys=[*keys, "_rank"], join_type="left semi")
    return table.drop_columns(["_rank"])


def _mask_columns(columns: list[str] | None) -> list[str]:
    cols = list(MASK_SCHEMA.names) if columns is None else list(dict.fromkeys([*columns, "image_id", "class_id"]))
    unknown = [c for c in cols if c not in MASK_SCHEMA.names]
    if unknown:
        raise ValueError(f"no such store column(s) {unknown}; the columns are {MASK_SCHEMA.names}")
    return cols


def newest_rows(store: str, runs: list[RunMarker] | None = None, image_ids=None) -> pa.Table:
    """The newest committed row of each (image, class): ``image_id`` (string), ``class_id``
    (int8) and ``row`` (int64: its position over the mask parts of ``runs``, run after run, part
    after part: what :func:`iter_masks` takes as ``rows``), in no order; ``image_ids`` keeps
    those images only; ``runs`` as for :func:`iter_masks`.

    One pass over the keys of every part, then one ``is_in`` for ``image_ids``, one hash
    group-by and one semi join over the whole store, so the cost is a few Arrow operations
    whatever the number of parts (an operation per part or per batch would rebuild its hash
    table each time: minutes at a million images). Memory: the keys of every row, once (part row
    counts are checked against the markers as they are read: :func:`_part_file`). A
    caller that reads several subsets of one store computes this once and passes subsets of it
    (:class:`cam2seg.pipeline.segment.FoldMasks` does, one fold after another)."""
    markers = committed_runs(store) if runs is None else list(runs)
    keys, total = [], 0
    for rank, m in enumerate(markers):
        for part in m.parts.masks:
            with _part_file(store, part) as f:
                t = f.read(columns=["image_id", "class_id"])
            keys.append(t.append_column("_rank", pa.array(np.full(t.num_rows, rank, np.int32)))
                        .append_column("row", pa.array(np.arange(total, total + t.num_rows, dtype=np.int64))))
            total += t.num_rows
    schema = pa.schema([MASK_SCHEMA.field("image_id"), MASK_SCHEMA.field("class_id"), ("row", pa.int64())])
    if not keys:
        return schema.empty_table()
    table = pa.concat_tables(keys)
    if image_ids is not None:
        table = table.filter(pc.is_in(table.column("image_id"), value_set=id_array(image_ids)))
    newest = _newest_ranks(table, ["image_id", "class_id"])
    if newest is not None:
        table = table.join(newest, keys=["image_id", "class_id", "_rank"], join_type="left semi")
    return table.select(schema.names)


def id_array(image_ids) -> pa.Array:
    """Image ids (a sequence, or a string array, chunked or not) as one string array."""
    if isinstance(image_ids, pa.ChunkedArray):
        return image_ids.combine_chunks()
    return image_ids if isinstance(image_ids, pa.Array) else pa.array(list(image_ids), pa.string())


def _row_flags(markers: list[RunMarker], rows) -> list[list[np.ndarray]]:
    """Per marker and mask part, ``bool[part rows]``: which of its rows ``rows`` (positions as
    :func:`newest_rows` numbers them) names."""
    sizes = [[p.rows for p in m.parts.masks] for m in markers]
    flags = np.zeros(sum(map(sum, sizes)), bool)
    rows = np.asarray(rows.to_numpy() if isinstance(rows, (pa.Array, pa.ChunkedArray)) else rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(flags)):
        raise ValueError(f"rows must be positions in 0..{len(flags) - 1} (as store.newest_rows numbers them)")
    flags[rows] = True
    out, at = [], 0
    for per_run in sizes:
        out.append([])
        for n in per_run:
            out[-1].append(flags[at : at + n])
            at += n
    return out


def iter_masks(store: str, columns: list[str] | None = None, batch_rows: int = 65_536,
               image_ids=None, runs: list[RunMarker] | None = None, rows=None) -> Iterator[pa.RecordBatch]:
    """The rows :func:`read_masks` returns, streamed: record batches of at most ``batch_rows``
    rows (:data:`MASK_SCHEMA`, or ``columns`` of it plus the keys), each (image, class) once, in
    store order (run after run, part after part); ``image_ids`` (any sequence or string array)
    keeps those images only. ``runs``: the markers to read (as :func:`committed_runs` returned
    them earlier), so that several reads see the same runs while a labeling job commits more;
    default: the store's now. ``rows``: int64 positions of :func:`newest_rows` over the same
    ``runs`` (a subset of them, in any order), read instead of ``image_ids``: several reads of
    one store then pass over its keys once.

    For stores too large to hold: memory is one batch plus, when several runs hold rows or
    ``image_ids`` picks some, the (image, class) keys of the store and one flag per row,
    computed once up front."""
    cols = _mask_columns(columns)
    markers = committed_runs(store) if runs is None else list(runs)
    if rows is not None and image_ids is not None:
        raise ValueError("pass image_ids or rows, not both")
    kept = None
    if rows is not None:
        kept = _row_flags(markers, rows)
    elif image_ids is not None or sum(bool(m.parts.masks) for m in markers) > 1:
        kept = _row_flags(markers, newest_rows(store, markers, image_ids).column("row"))
    for rank, m in enumerate(markers):
        for j, part in enumerate(m.parts.masks):
            flags = None if kept is None else kept[rank][j]
            if flags is not None and not flags.any():
                continue  # no row of this part is kept
            at = 0
            with _part_file(store, part) as f:
                for batch in f.iter_batches(batch_size=batch_rows, columns=cols):
                    keep = None if flags is None else flags[at : at + batch.num_rows]
                    at += batch.num_rows
                    if keep is not None and not keep.all():
                        batch = batch.filter(pa.array(keep))
                    if batch.num_rows:
                        yield batch


def read_masks(store: str, columns: list[str] | None = None, image_ids=None,
               runs: list[RunMarker] | None = None) -> pa.Table:
    """Committed rows, the newest run's per (image, class): a pyarrow Table with
    :data:`MASK_SCHEMA` (or ``columns`` of it), sorted by image and class; ``image_ids`` keeps
    those images only; ``runs`` as for :func:`iter_masks`. A store of millions of images is better read with :func:`iter_masks`,
    with a few ``columns`` or for some ``image_ids``."""
    cols = _mask_columns(columns)
    batches = list(iter_masks(store, cols, image_ids=image_ids, runs=runs))
    table = pa.Table.from_batches(batches, schema=MASK_SCHEMA.empty_table().select(cols).schema)
    return table.sort_by([("image_id", "ascending"), ("class_id", "ascending")])


def read_errors(store: str) -> pa.Table:
    """The newest committed error per image, for images no committed run has labeled."""
    markers = committed_runs(store)
    errors = _newest(read_parts(store, markers, "errors", ERROR_SCHEMA), ["image_id"])
    labeled = pc.unique(read_parts(store, markers, "masks", MASK_SCHEMA, ["image_id"]).column("image_id"))
    errors = errors.filter(pc.invert(pc.is_in(errors.column("image_id"), value_set=labeled)))
    return errors.sort_by("image_id")


def labeled_ids(store: str, model_version: str | None) -> pa.Array:
    """Images some committed run has labeled with ``model_version`` (None: with any model;
    errors do not count): a ``pa.string()`` array of unique ids, for ``pc.is_in`` (a Python set of
    millions of ids would cost ~100 bytes each)."""
    uniques = []
    for m in committed_runs(store):
        if model_version is not None and m.model_version is not None and m.model_version != model_version:
            continue  # the marker's version is the one its rows carry: skip the run unread
        for part in m.parts.masks:
            with _part_file(store, part) as f:
                t = f.read(columns=["image_id", "model_version"])
            if model_version is not None:
                t = t.filter(pc.equal(t.column("model_version"), model_version))
            uniques.append(pc.unique(t.column("image_id")))
    if not uniques:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array(uniques, pa.string()))


def decode_mask(row: dict) -> np.ndarray:
    """A store row (a dict, e.g. from ``Table.to_pylist()``) -> ``bool[height, width]``."""
    return rle.decode(row["encoded_pixels"] or "", int(row["height"]), int(row["width"]))


def remove_uncommitted(store: str, *, lease: Lease | None = None) -> int:
    """Delete parts no marker lists (left by crashed runs); returns how many.

    Only the holder of the store's :class:`Lease` may call it, or a running job's fresh parts
    would go. With ``lease`` (what :class:`RunWriter` passes), ``_lock.json`` is re-read before
    the listing and before every single delete, and :class:`StoreBusy` stops the deleting as soon
    as another run owns the lock (or it is gone). Without ``lease`` nothing is checked: the
    caller vouches that it holds the lease.
    """
    if lease is not None:
        lease.check()
    fs, root = io.filesystem(store)
    root = root.rstrip("/")
    listed = {p.file for m in committed_runs(store) for p in (*m.parts.masks, *m.parts.errors)}
    removed = 0
    for kind in ("masks", "errors"):
        fs.invalidate_cache(f"{root}/{kind}")  # and its parents: a fresh listing (see io.filesystem)
        if not fs.exists(f"{root}/{kind}"):
            continue
        for path in fs.find(f"{root}/{kind}", withdirs=False):
            if path[len(root) + 1 :] not in listed:
                if lease is not None:
                    lease.check()
                fs.rm_file(path)
                removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), None elsewhere: with
    the pid it names one process, so a pid reused after a crash (a restarted container) does not
    pass for the holder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


class Lease:
    """Exclusive right to write a store, as a ``_lock.json`` object with a heartbeat.

    The lock records the holder's run id, host, pid (and its start time), heartbeat and its own
    ``ttl``; the holder rewrites the heartbeat every ``ttl / 4`` seconds. A lease is taken over
    only when its holder is gone:

    * on this host (same hostname): only when its pid is dead (or is now another process). A
      live holder here is never taken, however old its heartbeat or short the newcomer's ttl;
    * on another host: when its heartbeat is older than the ttl *the holder wrote* (a lock
      without one counts as ``max(ttl, 600)``). The newcomer's own ``ttl`` never shortens it.

    Otherwise :class:`StoreBusy`. Before each heartbeat the holder re-reads the lock; if another
    run owns it (or it was removed) the lease is *lost*: the heartbeat stops for good, never
    overwriting the successor, and :meth:`check` (which :class:`RunWriter` calls before every
    commit and :func:`remove_uncommitted` before every delete) raises :class:`StoreBusy`.

    Object stores have no atomic create or compare-and-swap here, so acquiring writes, waits
    ``settle`` seconds and re-reads: two runs starting in the same instant may both back off,
    never both proceed. The same read-then-write race remains between a heartbeat's re-read and
    its write, and between :meth:`check` and the write it guards; the lease narrows these
    windows to one request, it does not close them.
    """

    def __init__(self, store: str, run_id: str, ttl: float = 600.0, settle: float = 0.5):
        self.store, self.run_id, self.ttl, self.settle = store, run_id, ttl, settle
        self.url = io.join(store, LOCK)
        self._stop = threading.Event()
        self._thread = None
        self._held = False
        self.lost_to: dict | None = None  # the lock that replaced ours, once the lease is lost

    @property
    def lost(self) -> bool:
        """True once the heartbeat or :meth:`check` saw another run own the lock."""
        return self.lost_to is not None

    def _body(self) -> dict:
        pid = os.getpid()
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": pid, "started": _pid_started(pid),
                "ttl": self.ttl, "heartbeat": time.time()}

    def _read(self) -> dict | None:
        """The lock as stored; None if there is none. A torn or foreign lock reads as an empty
        dict (no holder). OSError if it cannot be read."""
        try:
            held = json.loads(io.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return held if isinstance(held, dict) else {}

    def _current(self) -> dict | None:
        held = self._read()
        return held or None  # a torn or foreign lock file: treat as absent

    def _stale(self, held: dict) -> bool:
        if held.get("host") == socket.gethostname():
            try:
                pid = int(held.get("pid", -1))
            except (TypeError, ValueError):
                return True
            if not _pid_alive(pid):
                return True
            started = held.get("started")
            now_started = _pid_started(pid)
            # the pid lives, but as another process than the one that wrote the lock
            return started is not None and now_started is not None and str(started) != now_started
        try:
            ttl = float(held["ttl"])
        except (KeyError, TypeError, ValueError):
            ttl = max(self.ttl, 600.0)
        try:
            heartbeat = float(held.get("heartbeat", 0))
        except (TypeError, ValueError):
            heartbeat = 0.0
        return time.time() - heartbeat > ttl

    def _describe(self, held: dict | None) -> str:
        if not held:
            return f"{self.url} was removed"
        try:
            age = f"{time.time() - float(held.get('heartbeat', 0)):.0f}s ago"
        except (TypeError, ValueError):
            age = "unknown"
        return (f"run {held.get('run_id')} (host {held.get('host')}, pid {held.get('pid')}, heartbeat {age}, "
                f"ttl {held.get('ttl', '?')}s)")

    def acquire(self) -> Lease:
        try:
            held = self._current()
        except OSError as e:
            raise StoreError(f"cannot write to the label store {self.store}: {e}") from None
        if held is not None and held.get("run_id") != self.run_id and not self._stale(held):
            raise StoreBusy(f"{self.store} is being written by {self._describe(held)}; wait for it to finish, "
                            f"or if it died remove {self.url}")
        try:
            io.write_bytes(self.url, json.dumps(self._body()).encode())
        except (OSError, PermissionError) as e:
            raise StoreError(f"cannot write to the label store {self.store}: {e}") from None
        time.sleep(self.settle)
        held = self._current()
        if held is None or held.get("run_id") != self.run_id:
            raise StoreBusy(f"{self.store}: run {held and held.get('run_id')} took the lease at the same time")
        self._held, self.lost_to = True, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="cam2seg-lease")
        self._thread.start()
        return self

    def _owned(self) -> bool:
        """Re-read the lock: True if it is still ours; records the loss otherwise. OSError if it
        cannot be read (no verdict)."""
        held = self._read()
        if held is not None and held.get("run_id") == self.run_id:
            return True
        self.lost_to = held or {}
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self._owned():
                    return  # lost: never overwrite the successor's lock
                io.write_bytes(self.url, json.dumps(self._body()).encode())
            except Exception:  # a missed beat only shortens the lease; the next one retries
                pass

    def check(self) -> None:
        """Raise :class:`StoreBusy` unless this lease is held and ``_lock.json`` still names
        this run (read fresh). Call it right before anything only the holder may do."""
        if not self._held:
            raise StoreBusy(f"{self.store}: run {self.run_id} does not hold the lease ({self.url})")
        if not self.lost:
            try:
                if self._owned():
                    return
            except OSError as e:
                raise StoreError(f"{self.store}: cannot read the lease {self.url}: {e}") from None
        self._stop.set()
        raise StoreBusy(f"{self.store}: lease lost to {self._describe(self.lost_to)}; run {self.run_id} "
                        f"stops without committing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._held = False
        held = self._current()
        if held is not None and held.get("run_id") == self.run_id:
            fs, path = io.filesystem(self.url)
            fs.rm_file(path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunWriter:
    """A labeling run's side of the commit protocol, for the run that holds the lease.

    ``with RunWriter(store, marker, commit_every, lease_ttl) as w:`` takes the lease and
    removes parts a crashed run left (``w.removed`` says how many); ``w.add(...)`` records a
    written part batch and commits the marker once ``commit_every`` more images are in it
    (returning True then); ``w.finish(todo)`` checks that every image to do is in exactly one of
    masks (once per class) or errors, commits the marker as complete and removes parts no marker
    lists that appeared meanwhile. Every commit and delete first re-checks the lease
    (:meth:`Lease.check`): once another run owns the store, ``add`` and ``finish`` raise
    :class:`StoreBusy` ("lease lost to run ...") and commit nothing more.
    """

    def __init__(self, store: str, marker: RunMarker, commit_every: int, lease_ttl: float = 600.0):
        self.store, self.marker, self.commit_every = store, marker, commit_every
        self.lease = Lease(store, marker.run_id, ttl=lease_ttl)
        self.removed, self._since = 0, 0

    def __enter__(self) -> RunWriter:
        self.lease.acquire()
        try:
            self.removed = remove_uncommitted(self.store, lease=self.lease)
        except BaseException:
            self.lease.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lease.release()

    @property
    def done(self) -> int:
        """Images written so far (labeled or errors)."""
        return self.marker.labeled + self.marker.errors

    def add(self, masks: Part | None, errors: Part | None, images: int, error_images: int) -> bool:
        m = self.marker
        if masks is not None:
            m.parts.masks.append(masks)
        if errors is not None:
            m.parts.errors.append(errors)
        m.labeled += images
        m.errors += error_images
        self._since += images + error_images
        if self.lease.lost:
            self.lease.check()  # raises: the lease went to another run
        if self._since < self.commit_every:
            return False
        self.lease.check()
        commit(self.store, m.run_id, m.model_copy(update={"end": now()}))
        self._since = 0
        return True

    def finish(self, todo: list[str], positives: list[int]) -> RunMarker:
        """Reconcile the run's parts with ``todo`` and commit it complete; anything that does not
        add up is a bug worth stopping for (RuntimeError), not a number to print."""
        m = self.marker
        if self.done != len(todo):
            raise RuntimeError(f"run {m.run_id}: {len(todo)} images to do, but {m.labeled} labeled + "
                               f"{m.errors} errors; not committing it as complete")
        ids = read_parts(self.store, [m], "masks", MASK_SCHEMA, ["image_id", "class_id"])
        errs = read_parts(self.store, [m], "errors", ERROR_SCHEMA, ["image_id"])
        # in Arrow (hash aggregation, is_in), not Python sets: a run may hold millions of rows
        pairs = ids.group_by(["image_id", "class_id"]).aggregate([]).num_rows
        labeled = pc.unique(ids.column("image_id"))
        seen = pc.unique(pa.chunked_array([labeled, errs.column("image_id").combine_chunks()], pa.string()))
        wanted = pa.array(todo, pa.string())
        same = len(seen) == len(pc.unique(wanted)) and bool(pc.all(pc.is_in(wanted, value_set=seen)).as_py()) \
            if len(wanted) else len(seen) == 0
        if pairs != ids.num_rows or not same or len(labeled) + errs.num_rows != len(todo):
            raise RuntimeError(f"run {m.run_id}: written rows do not reconcile with the {len(todo)} images to do "
                               f"({ids.num_rows} mask rows, {pairs} distinct, {errs.num_rows} errors)")
        m.complete, m.end, m.positives = True, now(), list(positives)
        self.lease.check()
        self.marker = commit(self.store, m.run_id, m)
        # parts that appeared since __enter__ and no marker lists (a crashed or ousted run's
        # late writes) go too, so a complete run leaves only committed files; best effort: the
        # run is committed, and the next run removes whatever is left
        try:
            self.removed += remove_uncommitted(self.store, lease=self.lease)
        except (StoreError, OSError):
            pass
        return self.marker
