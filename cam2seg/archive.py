"""Readers for labelled image archives in the Severstal layout (README.md, "Archive layouts").

An archive is a folder (any fsspec URL) holding ``train_images/<ImageId>`` and one of:

* ``train.csv`` with ``ImageId,ClassId,EncodedPixels``: one row per non-empty (image, class)
  mask; images absent from it are clean. With ``EncodedPixels`` empty in every row it is a
  labels-only archive (image-level labels, no masks).
* ``labels.csv`` with ``ImageId`` and one 0/1 column per class (``1``..``C``, ``class_1``,
  ``Class1``...): one row per image, clean ones included. Always labels-only.

``Archive.open(URL)`` takes the folder (``train.csv`` preferred, else ``labels.csv``) or a
CSV file inside it, which picks that file. Class ids are 1-based in files and the label
store; array axes are 0-based (axis c holds ClassId c + 1).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field

import numpy as np

from . import io, rle

__all__ = ["ArchiveError", "Archive", "NUM_CLASSES"]

NUM_CLASSES = 4
IMAGES_DIR = "train_images"
_MAX_LISTED = 5
#: Longest CSV line accepted (bytes). Severstal's longest RLE line is ~50 KB; a full-image
#: worst case at 256x1600 is ~2 MB.
MAX_LINE_BYTES = 8 * 1024 * 1024
_HEADER_BYTES = 64 * 1024


class ArchiveError(ValueError):
    """A malformed archive; the message names the file and the offending lines."""


def _lines(items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


@dataclass
class Archive:
    """Image-level labels (and true masks where present) of one archive.

    ``image_ids``: sorted keys relative to ``images_url``. ``labels``: ``uint8[N, C]``.
    ``has_masks``: whether ``masks()`` returns true masks. Masks are decoded on demand.
    """

    root: str
    source: str
    image_ids: list[str]
    labels: np.ndarray
    has_masks: bool
    num_classes: int = NUM_CLASSES
    _rles: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict, repr=False)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def images_url(self) -> str:
        return io.join(self.root, IMAGES_DIR)

    @property
    def class_ids(self) -> list[int]:
        return list(range(1, self.num_classes + 1))

    def __len__(self) -> int:
        return len(self.image_ids)

    def index(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in archive {self.root}") from None

    def image_url(self, image_id: str) -> str:
        self.index(image_id)
        return io.join(self.images_url, image_id)

    def read_image(self, image_id: str) -> np.ndarray:
        """``uint8[H, W]`` or ``uint8[H, W, 3]``."""
        return io.decode_image(io.read_bytes(self.image_url(image_id)))

    def image_shape(self, image_id: str) -> tuple[int, int]:
        return io.image_size(io.read_bytes(self.image_url(image_id)))

    def rle(self, image_id: str, class_id: int) -> str:
        """The true mask's RLE for (image, 1-based class id); "" when absent."""
        self.index(image_id)
        return self._rles.get((image_id, class_id), ("", 0))[0]

    def masks(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """True masks ``bool[C, H, W]`` of one image; ``shape`` saves reading the image header."""
        if not self.has_masks:
            raise ArchiveError(f"{self.source} holds image-level labels only, no masks")
        h, w = shape if shape is not None else self.image_shape(image_id)
        out = np.zeros((self.num_classes, h, w), dtype=bool)
        for c in self.class_ids:
            text, line = self._rles.get((image_id, c), ("", 0))
            if text:
                try:
                    out[c - 1] = rle.decode(text, h, w)
                except rle.RLEError as e:
                    raise ArchiveError(f"{self.source} line {line}: {image_id} class {c}: {e}") from None
        return out

    def true_areas(self) -> np.ndarray:
        """``int64[N, C]`` true mask areas (from the run lengths, nothing decoded)."""
        if not self.has_masks:
            raise ArchiveError(f"{self.source} holds image-level labels only, no masks")
        out = np.zeros((len(self), self.num_classes), dtype=np.int64)
        for (image_id, c), (text, _) in self._rles.items():
            out[self._index[image_id], c - 1] = rle.runs(text, 1, 2**40)[1].sum()
        return out

    @property
    def defective(self) -> np.ndarray:
        """``bool[N]``: images with at least one defect class."""
        return self.labels.any(axis=1)

    def check_images(self, threads: int = 16) -> None:
        """Read every image's header (not its pixels) and raise ArchiveError naming the ones
        that cannot be read, are not images, or resolve outside ``train_images/`` (symlinks).

        One small read per image (``threads`` at a time): cheap on a local disk (about a second
        per 10k images), minutes per million on S3, so :meth:`open` does not do it; training
        calls it before any worker starts. :meth:`open` already refuses empty files (from the
        listing, at no cost).
        """
        from concurrent.futures import ThreadPoolExecutor

        prefix = self.images_url

        def problem(image_id: str) -> str | None:
            url = io.join(prefix, image_id)
            try:
                if io.outside_prefix(url, prefix):
                    return f"{image_id}: resolves outside the image prefix"
                fs, path = io.filesystem(url)
                with fs.open(path, "rb") as f:
                    head = f.read(_HEADER_BYTES)
                io.image_size(head)
            except io.ImageDecodeError as e:
                return f"{image_id}: {e}"
            except Exception as e:  # noqa: BLE001 -- reported, with the image, as a bad archive
                return f"{image_id}: {type(e).__name__}: {e}"
            return None

        with ThreadPoolExecutor(max(1, threads)) as pool:
            bad = [p for p in pool.map(problem, self.image_ids) if p]
        if bad:
            raise ArchiveError(f"archive {self.root}: {len(bad)} unreadable image(s) under {IMAGES_DIR}/: "
                               + _lines(bad))

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, url: str, num_classes: int = NUM_CLASSES, check_images: bool = True,
             strict_images: bool = True) -> Archive:
        """Read and validate an archive's labels; see the module docstring for layouts.

        ``check_images`` lists ``train_images/`` (one listing call), which also finds the clean
        images a long ``train.csv`` does not list; with ``strict_images`` it fails on CSV rows
        whose image is missing and on empty or dangling image files (``strict_images=False``:
        the labels of whatever is there, for jobs that report bad files themselves).
        """
        url = io.absolute(str(url).rstrip("/"))
        if url.lower().endswith(".csv"):
            root, _, name = url.rpartition("/")
            candidates = [name]
        else:
            root, candidates = url, ["train.csv", "labels.csv"]
        source = next((io.join(root, n) for n in candidates if io.exists(io.join(root, n))), None)
        if source is None:
            raise ArchiveError(f"no {' or '.join(candidates)} in archive {root}")
        rows = _read_csv(source)
        if not rows:
            raise ArchiveError(f"{source} is empty (expected a header row)")
        header = [h.strip() for h in rows[0]]
        if "ImageId" in header and "ClassId" in header:
            parsed = _parse_long(source, header, rows[1:], num_classes)
        else:
            parsed = _parse_wide(source, header, rows[1:], num_classes)
        listed_ids, labels_by_id, rles, has_masks = parsed

        if check_images:
            try:
                sizes = io.list_image_sizes(io.join(root, IMAGES_DIR))
            except FileNotFoundError:
                raise ArchiveError(f"archive {root} has no {IMAGES_DIR}/ folder") from None
            present = set(sizes)
            if strict_images:
                _check_present(source, root, listed_ids, sizes)
        else:
            present = set(listed_ids)
        if source.endswith("labels.csv") or "ClassId" not in header:
            image_ids = sorted(listed_ids)  # the wide file lists every image, clean included
        else:
            image_ids = sorted(present | set(listed_ids))  # absent from train.csv = clean
        labels = np.zeros((len(image_ids), num_classes), dtype=np.uint8)
        index = {iid: i for i, iid in enumerate(image_ids)}
        for iid, lab in labels_by_id.items():
            labels[index[iid]] = lab
        return cls(
            root=root,
            source=source,
            image_ids=image_ids,
            labels=labels,
            has_masks=has_masks,
            num_classes=num_classes,
            _rles=rles,
            _index=index,
        )


def _check_present(source: str, root: str, listed_ids: dict[str, int], sizes: dict[str, int | None]) -> None:
    """Every image the CSV lists exists under ``train_images/``, and none is empty or dangling."""
    missing = [f"line {line}: {iid}" for iid, line in listed_ids.items() if iid not in sizes]
    if missing:
        raise ArchiveError(
            f"{source}: {len(missing)} image(s) listed but missing under {root}/{IMAGES_DIR}/: " + _lines(missing)
        )
    # the listing carries sizes: empty files and dangling links cost no extra request
    empty = [f"{iid} ({'dangling link' if n is None else 'empty file'})" for iid, n in sizes.items() if not n]
    if empty:
        raise ArchiveError(f"archive {root}: {len(empty)} unreadable image(s) under {IMAGES_DIR}/: " + _lines(empty))


def _bounded_lines(f, limit: int, chunk: int = 1 << 20):
    """Lines of a binary file object (with their line ends), read in chunks, so that a line
    longer than ``limit`` is yielded as its first ``limit + 1`` bytes and never held whole
    (object-store files have no ``readline(size)``)."""
    pending = b""
    while True:
        block = f.read(chunk)
        if not block:
            if pending:
                yield pending
            return
        pending += block
        while True:
            end = pending.find(b"\n")
            if end < 0:
                if len(pending) > limit:
                    yield pending[: limit + 1]  # the caller refuses it
                    return
                break
            yield pending[: end + 1]
            pending = pending[end + 1 :]


def _read_csv(source: str) -> list[list[str]]:
    """Rows of a CSV, read as a stream of bounded lines: a line over MAX_LINE_BYTES, bytes that
    are not UTF-8 or a CSV syntax error end with an ArchiveError naming the file and line,
    without the line ever being held whole."""
    fs, path = io.filesystem(source)

    def lines():
        with fs.open(path, "rb") as f:
            number = 0
            for raw in _bounded_lines(f, MAX_LINE_BYTES):
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise ArchiveError(f"{source} line {number}: longer than {MAX_LINE_BYTES} bytes; refused "
                                       "(not a train.csv/labels.csv?)")
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ArchiveError(f"{source} line {number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                       f"{e.start + 1}); save the file as UTF-8") from None

    if csv.field_size_limit() < MAX_LINE_BYTES:
        csv.field_size_limit(MAX_LINE_BYTES)  # the line limit above is the real bound
    reader = csv.reader(lines())
    try:
        return list(reader)
    except csv.Error as e:
        raise ArchiveError(f"{source} line {reader.line_num}: {e}") from None


def _check_id(source: str, line: int, image_id: str) -> str:
    try:
        return io.check_key(image_id.strip())
    except ValueError as e:
        raise ArchiveError(f"{source} line {line}: bad ImageId: {e}") from None


def _data_rows(header, rows, bad: list[str]):
    """Yield (1-based line number, row) for non-blank rows; rows of the wrong width go to ``bad``."""
    for i, row in enumerate(rows):
        line = i + 2  # after the header
        if not row or all(not x.strip() for x in row):
            continue
        if len(row) != len(header):
            bad.append(f"line {line}: {len(row)} fields, header has {len(header)}")
            continue
        yield line, row


def mask_rows(source, header, rows, num_classes, bad: list[str], dup: list[str], keep=None):
    """Yield (line, image id, class id, RLE text or "") of a long CSV's data rows
    (``ImageId,ClassId,EncodedPixels``; ``header`` the stripped first row, ``rows`` the rest).
    Rows with a bad class id or RLE syntax go to ``bad``, repeated (image, class) pairs to ``dup``
    (the caller raises); ``keep(line, image_id)`` may drop a row (False) after the id check."""
    missing = [c for c in ("ImageId", "ClassId", "EncodedPixels") if c not in header]
    if missing:
        raise ArchiveError(f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(header)}")
    ci, cc, ce = (header.index(c) for c in ("ImageId", "ClassId", "EncodedPixels"))
    seen: dict[tuple[str, int], int] = {}
    for line, row in _data_rows(header, rows, bad):
        image_id = _check_id(source, line, row[ci])
        if keep is not None and not keep(line, image_id):
            continue
        try:
            class_id = int(row[cc])
        except ValueError:
            bad.append(f"line {line}: ClassId {row[cc]!r} is not an integer")
            continue
        if not 1 <= class_id <= num_classes:
            bad.append(f"line {line}: ClassId {class_id} out of range 1..{num_classes}")
            continue
        key = (image_id, class_id)
        if key in seen:
            dup.append(f"lines {seen[key]} and {line}: ({image_id}, {class_id})")
            continue
        seen[key] = line
        text = row[ce].strip()
        if text:
            try:
                rle.runs(text, 1, 2**40)  # syntax and order; bounds are checked at decode time
            except rle.RLEError as e:
                bad.append(f"line {line}: EncodedPixels: {e}")
                continue
        yield line, image_id, class_id, text


def _parse_long(source, header, rows, num_classes):
    """train.csv: ImageId,ClassId,EncodedPixels; one row per (image, defect class)."""
    listed: dict[str, int] = {}
    labels: dict[str, np.ndarray] = {}
    rles: dict[tuple[str, int], tuple[str, int]] = {}
    bad, dup = [], []
    n_with, n_without = 0, 0
    for line, image_id, class_id, text in mask_rows(source, header, rows, num_classes, bad, dup):
        if text:
            n_with += 1
            rles[(image_id, class_id)] = (text, line)
        else:
            n_without += 1
        listed.setdefault(image_id, line)
        labels.setdefault(image_id, np.zeros(num_classes, dtype=np.uint8))[class_id - 1] = 1
    if bad:
        raise ArchiveError(f"{source}: {len(bad)} bad row(s): " + _lines(bad))
    if dup:
        raise ArchiveError(f"{source}: {len(dup)} duplicate (ImageId, ClassId) row(s): " + _lines(dup))
    if n_with and n_without:
        raise ArchiveError(
            f"{source}: {n_without} row(s) have empty EncodedPixels and {n_with} do not; a file holds "
            "either masks for every row or image-level labels only"
        )
    return listed, labels, rles, n_with > 0


_CLASS_COL = re.compile(r"^(?:class[_ ]?)?(\d+)$", re.IGNORECASE)


def _parse_wide(source, header, rows, num_classes):
    """labels.csv: ImageId plus one 0/1 column per class; one row per image."""
    if "ImageId" not in header:
        raise ArchiveError(f"{source}: missing column ImageId; found {', '.join(header)}")
    cols: dict[int, int] = {}
    for j, name in enumerate(header):
        m = _CLASS_COL.match(name)
        if m:
            cols[int(m.group(1))] = j
    want = list(range(1, num_classes + 1))
    if sorted(cols) != want:
        raise ArchiveError(
            f"{source}: expected one 0/1 column per class {want} (named 1..{num_classes} or class_1..), "
            f"found {', '.join(header)}"
        )
    ci = header.index("ImageId")
    listed: dict[str, int] = {}
    labels: dict[str, np.ndarray] = {}
    bad, dup = [], []
    for line, row in _data_rows(header, rows, bad):
        image_id = _check_id(source, line, row[ci])
        if image_id in listed:
            dup.append(f"lines {listed[image_id]} and {line}: {image_id}")
            continue
        vals = [row[cols[c]].strip() for c in want]
        if any(v not in ("0", "1") for v in vals):
            bad.append(f"line {line}: class columns must be 0 or 1, got {vals}")
            continue
        listed[image_id] = line
        labels[image_id] = np.array([int(v) for v in vals], dtype=np.uint8)
    if bad:
        raise ArchiveError(f"{source}: {len(bad)} bad row(s): " + _lines(bad))
    if dup:
        raise ArchiveError(f"{source}: {len(dup)} duplicate ImageId row(s): " + _lines(dup))
    return listed, labels, {}, False


def iter_class_masks(archive: Archive, limit: int | None = None, shape: tuple[int, int] | None = None):
    """Yield (class id, ``bool[H, W]``) for every true mask of the first ``limit`` defective images."""
    ids = [iid for iid, d in zip(archive.image_ids, archive.defective) if d][:limit]
    for image_id in ids:
        masks = archive.masks(image_id, shape)
        for c in range(archive.num_classes):
            if masks[c].any():
                yield c + 1, masks[c]
