"""Readers for labelled image archives (README.md, "Archive layouts").

An archive is a folder (any fsspec URL) in one of these layouts:

* ``train_images/<ImageId>`` and ``train.csv`` with ``ImageId,ClassId,EncodedPixels`` (Kaggle
  Severstal): one row per non-empty (image, class) mask; images absent from it are clean. With
  ``EncodedPixels`` empty in every row it is a labels-only archive (image-level labels, no masks).
* ``train_images/<ImageId>`` and ``labels.csv``, either *wide*: ``ImageId`` and one 0/1 column
  per class, the header naming the classes (Severstal's numbered headers ``1``..``C``,
  ``class_1``, ``Class1``... name them ``"class 1"``..), one row per image, clean ones included;
  or *long*: ``ImageId,Class``, one row per present class, images without a row clean. Always
  labels-only.
* folder per class (MVTec AD, most classification sets): ``images/<class>/<file>`` (nested
  subfolders allowed), clean images in ``images/good/``; the ImageId is the path under
  ``images/`` (``scratch/000.png``). With ``ground_truth/<class>/<stem>_mask.png`` beside it,
  the archive has true masks (a pixel is in the mask where the PNG is non-zero).

``Archive.open(URL)`` takes the folder (``train.csv`` preferred, else ``labels.csv``, else the
folder per class) or a CSV file inside it, which picks that file.

Classes: ``class_names`` in order; class id k (1-based, as in every file and the label store)
is ``class_names[k - 1]``, and array axis c (0-based) holds class id c + 1. A ``ClassId`` or
``Class`` value is a class name or a 1-based index. The class list of a long CSV is ``classes=``
if given, else the header of a wide ``labels.csv`` beside it, else ``class 1``..``class <max
id>`` for integer ids, else the sorted names found. Images of one archive may differ in size.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import posixpath
import re
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np

from . import io, rle
from .classes import default_names

__all__ = ["ArchiveError", "Archive", "NUM_CLASSES", "MAX_CLASSES", "reading"]

#: Severstal's class count (synthetic archives); archives say their own now.
NUM_CLASSES = 4
#: The label store keeps class ids as int8, so an archive holds at most this many classes (this
#: also keeps a stray ``ClassId 999999999`` from allocating a billion label columns).
MAX_CLASSES = 127
MAX_CLASS_NAME = 100
IMAGES_DIR = "train_images"
CLASS_IMAGES_DIR = "images"
GROUND_TRUTH_DIR = "ground_truth"
MASK_SUFFIX = "_mask"
_MAX_LISTED = 5
#: Longest CSV line accepted (bytes). Severstal's longest RLE line is ~50 KB; a full-image
#: worst case at 256x1600 is ~2 MB.
MAX_LINE_BYTES = 8 * 1024 * 1024
_HEADER_BYTES = 64 * 1024
_LAYOUTS = ("train.csv (with train_images/)", "labels.csv (with train_images/)",
            f"{CLASS_IMAGES_DIR}/<class>/ folders (folder per class)")


class ArchiveError(ValueError):
    """A malformed archive; the message names the file and the offending lines."""


def _lines(items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


# What `Archive.open` uses when its caller passes no ``classes`` / ``clean``: set for a whole
# command by :func:`reading` (the CLI sets it from the config's ``archive`` section), so every
# stage that opens the archive reads it the same way.
_READING: contextvars.ContextVar[dict] = contextvars.ContextVar("cam2seg_archive_reading", default={})


@contextlib.contextmanager
def reading(classes: list[str] | None = None, clean: str | None = None):
    """Within the block, :meth:`Archive.open` reads archives with these ``classes`` and
    ``clean`` folder unless its caller passes its own."""
    token = _READING.set({k: v for k, v in {"classes": classes, "clean": clean}.items() if v is not None})
    try:
        yield
    finally:
        _READING.reset(token)


def _numbered_names(count: int) -> list[str]:
    """``["class 1", ..., "class <count>"]``: the names of numbered classes."""
    return default_names(range(1, count + 1))


@dataclass
class Archive:
    """Image-level labels (and true masks where present) of one archive.

    ``image_ids``: sorted keys relative to ``images_url``. ``labels``: ``uint8[N, C]``.
    ``class_names``: C names; class id k is ``class_names[k - 1]``. ``images_dir``: the image
    folder under ``root``. ``has_masks``: whether ``masks()`` returns true masks. Masks are
    decoded on demand (RLE rows, or the PNG files of a folder-per-class archive).
    """

    root: str
    source: str
    image_ids: list[str]
    labels: np.ndarray
    has_masks: bool
    num_classes: int = NUM_CLASSES
    class_names: list[str] = field(default_factory=list)
    images_dir: str = IMAGES_DIR
    _rles: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict, repr=False)
    #: image id -> (mask PNG key under ``root``, its class id): masks kept as files, read lazily
    _mask_files: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = _numbered_names(self.num_classes)
        if len(self.class_names) != self.num_classes or self.labels.shape[1:] != (self.num_classes,):
            raise ValueError(f"archive {self.root}: {self.num_classes} classes but {len(self.class_names)} "
                             f"names and labels of shape {self.labels.shape}")

    @property
    def images_url(self) -> str:
        return io.join(self.root, self.images_dir)

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
        if image_id in self._mask_files:
            if self._mask_files[image_id][1] != class_id:
                return ""  # a folder-per-class image has its folder's class only
            return rle.encode(self._png_mask(image_id))
        return self._rles.get((image_id, class_id), ("", 0))[0]

    def masks(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """True masks ``bool[C, H, W]`` of one image; ``shape`` (the image's own size) saves
        reading the image header."""
        if not self.has_masks:
            raise ArchiveError(f"{self.source} holds image-level labels only, no masks")
        h, w = shape if shape is not None else self.image_shape(image_id)
        out = np.zeros((self.num_classes, h, w), dtype=bool)
        if image_id in self._mask_files:
            out[self._mask_files[image_id][1] - 1] = self._png_mask(image_id, (h, w))
            return out
        for c in self.class_ids:
            text, line = self._rles.get((image_id, c), ("", 0))
            if text:
                try:
                    out[c - 1] = rle.decode(text, h, w)
                except rle.RLEError as e:
                    raise ArchiveError(f"{self.source} line {line}: {image_id} class {c}: {e}") from None
        return out

    def true_areas(self) -> np.ndarray:
        """``int64[N, C]`` true mask areas: from the run lengths (nothing decoded), or by reading
        every mask PNG (and its image's header, to check the sizes agree)."""
        if not self.has_masks:
            raise ArchiveError(f"{self.source} holds image-level labels only, no masks")
        out = np.zeros((len(self), self.num_classes), dtype=np.int64)
        for (image_id, c), (text, _) in self._rles.items():
            out[self._index[image_id], c - 1] = rle.runs(text, 1, 2**40)[1].sum()
        for image_id, (_, c) in self._mask_files.items():
            out[self._index[image_id], c - 1] = int(self._png_mask(image_id).sum())
        return out

    def _png_mask(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """``bool[H, W]``: the mask file of a folder-per-class image, checked against the
        image's size (``shape``, else read from the image)."""
        url = io.join(self.root, self._mask_files[image_id][0])
        try:
            mask = _decode_mask(io.read_bytes(url))
        except io.ImageDecodeError as e:
            raise ArchiveError(f"{url}: not a readable mask PNG: {e}") from None
        except FileNotFoundError:
            raise ArchiveError(f"{url}: mask file gone since the archive was opened") from None
        h, w = shape if shape is not None else self.image_shape(image_id)
        if mask.shape != (h, w):
            raise ArchiveError(f"{url}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {image_id} "
                               f"is {h}x{w}")
        return mask

    @property
    def defective(self) -> np.ndarray:
        """``bool[N]``: images with at least one defect class."""
        return self.labels.any(axis=1)

    def check_images(self, threads: int = 16) -> set[tuple[int, int]]:
        """Read every image's header (not its pixels) and raise ArchiveError naming the ones
        that cannot be read, are not images, or resolve outside the image folder (symlinks).
        Returns the set of (height, width) the images have (one element when they share a size).

        One small read per image (``threads`` at a time): cheap on a local disk (about a second
        per 10k images), minutes per million on S3, so :meth:`open` does not do it; training
        calls it before any worker starts. :meth:`open` already refuses empty files (from the
        listing, at no cost).
        """
        from concurrent.futures import ThreadPoolExecutor

        prefix = self.images_url

        def size_or_problem(image_id: str) -> tuple[int, int] | str:
            url = io.join(prefix, image_id)
            try:
                if io.outside_prefix(url, prefix):
                    return f"{image_id}: resolves outside the image prefix"
                fs, path = io.filesystem(url)
                with fs.open(path, "rb") as f:
                    head = f.read(_HEADER_BYTES)
                return tuple(io.image_size(head))
            except io.ImageDecodeError as e:
                return f"{image_id}: {e}"
            except Exception as e:  # noqa: BLE001 -- reported, with the image, as a bad archive
                return f"{image_id}: {type(e).__name__}: {e}"

        with ThreadPoolExecutor(max(1, threads)) as pool:
            found = list(pool.map(size_or_problem, self.image_ids))
        bad = [p for p in found if isinstance(p, str)]
        if bad:
            raise ArchiveError(f"archive {self.root}: {len(bad)} unreadable image(s) under {self.images_dir}/: "
                               + _lines(bad))
        return set(found)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, url: str, num_classes: int | None = None, check_images: bool = True,
             strict_images: bool = True, *, classes: list[str] | None = None, clean: str | None = None) -> Archive:
        """Read and validate an archive's labels; see the module docstring for layouts.

        ``check_images`` lists ``train_images/`` (one listing call), which also finds the clean
        images a long CSV does not list; with ``strict_images`` it fails on CSV rows whose image
        is missing and on empty or dangling image files (``strict_images=False``: the labels of
        whatever is there, for jobs that report bad files themselves). A folder-per-class
        archive is always listed (the listing is its labels).

        ``classes``: the class names in order (overrides what the files say; every class the
        files name must be one of them). ``num_classes``: the class count the caller expects
        (legacy callers pass 4); an archive with another count is refused. ``clean``: the
        folder of clean images in the folder-per-class layout (default "good"). Both default to
        what :func:`reading` set for the command.
        """
        context = _READING.get()
        classes = classes if classes is not None else context.get("classes")
        clean = clean if clean is not None else context.get("clean", "good")
        url = io.absolute(str(url).rstrip("/"))
        wanted = None if classes is None else _check_classes(classes)
        root, source = _find_source(url)
        if source is not None:
            found = _open_csv(root, source, wanted, check_images, strict_images)
        elif io.exists(io.join(root, CLASS_IMAGES_DIR)):
            found = _open_class_folders(root, wanted, _check_name("clean=", str(clean).strip()), strict_images)
        else:
            raise ArchiveError(f"no train.csv or labels.csv in archive {root}, and no {CLASS_IMAGES_DIR}/ folder; "
                               f"looked for: {', '.join(_LAYOUTS)}")
        names = found["class_names"]
        if num_classes is not None and int(num_classes) != len(names):
            raise ArchiveError(f"{found['source']}: {len(names)} classes found ({_names(names)}), but "
                               f"num_classes={num_classes} was asked for")
        ids = found["image_ids"]
        return cls(root=root, num_classes=len(names), _index={iid: i for i, iid in enumerate(ids)}, **found)


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _check_name(where: str, name: str) -> str:
    """``name`` if it can name a class (non-empty, printable, at most MAX_CLASS_NAME characters:
    names end up in reports, logs and file headers), else ArchiveError starting with ``where``
    (the file and column, line or folder)."""
    shown = repr(name) if len(name) <= MAX_CLASS_NAME else repr(name[:MAX_CLASS_NAME]) + "..."
    problem = ("is empty" if not name else
               f"is longer than {MAX_CLASS_NAME} characters" if len(name) > MAX_CLASS_NAME else
               "has non-printable characters" if not name.isprintable() else None)
    if problem:
        raise ArchiveError(f"{where}: class name {shown} {problem}")
    return name


def _check_classes(classes) -> list[str]:
    """The caller's ``classes=``: a list of unique valid names, 1..MAX_CLASSES of them."""
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise ArchiveError(f"classes={classes!r}: expected a list of class names")
    names = [_check_name(f"classes= item {k}", c.strip()) for k, c in enumerate(classes, 1)]
    if not 1 <= len(names) <= MAX_CLASSES or len(set(names)) != len(names):
        raise ArchiveError(f"classes={classes!r}: expected 1..{MAX_CLASSES} unique class names")
    return names


def _find_source(url: str) -> tuple[str, str | None]:
    """(archive root, the labels CSV to read or None for the folder-per-class layout)."""
    if url.lower().endswith(".csv"):
        root, _, name = url.rpartition("/")
        if not io.exists(url):
            raise ArchiveError(f"no {name} in archive {root}")
        return root, url
    return url, next((io.join(url, n) for n in ("train.csv", "labels.csv") if io.exists(io.join(url, n))), None)


# ------------------------------------------------------------------ CSV layouts
def _open_csv(root: str, source: str, wanted: list[str] | None, check_images: bool, strict_images: bool) -> dict:
    """``Archive`` fields (but ``root``) of an archive whose labels are the CSV ``source``."""
    rows = _read_csv(source)
    if not rows:
        raise ArchiveError(f"{source} is empty (expected a header row)")
    header = [h.strip() for h in rows[0]]
    kind = _csv_kind(header)
    rles, has_masks = {}, False
    if kind == "wide":
        names, cols = _wide_classes(source, header, wanted)
        listed, labels_by_id = _parse_wide(source, header, rows[1:], cols)
    else:
        names = wanted or _names_beside(source) or _names_from_rows(source, header, rows[1:], kind)
        if kind == "ClassId":
            listed, labels_by_id, rles, has_masks = _parse_long(source, header, rows[1:], names)
        else:
            listed, labels_by_id = _parse_class_rows(source, header, rows[1:], names)

    if check_images:
        try:
            sizes = io.list_image_sizes(io.join(root, IMAGES_DIR))
        except (FileNotFoundError, NotADirectoryError):
            raise ArchiveError(f"archive {root} has no {IMAGES_DIR}/ folder") from None
        present = set(sizes)
        if strict_images:
            _check_present(source, root, listed, sizes)
    else:
        present = set(listed)
    # a wide file lists every image, clean included; a long one leaves the clean ones out
    image_ids = sorted(listed) if kind == "wide" else sorted(present | set(listed))
    labels = np.zeros((len(image_ids), len(names)), dtype=np.uint8)
    index = {iid: i for i, iid in enumerate(image_ids)}
    for iid, lab in labels_by_id.items():
        labels[index[iid]] = lab
    return dict(source=source, image_ids=image_ids, labels=labels, has_masks=has_masks, class_names=names,
                images_dir=IMAGES_DIR, _rles=rles)


def _csv_kind(header: list[str]) -> str:
    """"ClassId" (``ImageId,ClassId,EncodedPixels``), "Class" (long labels ``ImageId,Class``) or
    "wide" (``ImageId`` and a 0/1 column per class), from a stripped header."""
    if "ImageId" in header and "ClassId" in header:
        return "ClassId"
    if "ImageId" in header and "Class" in header:
        return "Class"
    return "wide"


def _check_present(source: str, root: str, listed_ids: dict[str, int], sizes: dict[str, int | None]) -> None:
    """Every image the CSV lists exists under ``train_images/``, and none is empty or dangling."""
    missing = [f"line {line}: {iid}" for iid, line in listed_ids.items() if iid not in sizes]
    if missing:
        raise ArchiveError(
            f"{source}: {len(missing)} image(s) listed but missing under {root}/{IMAGES_DIR}/: " + _lines(missing)
        )
    _check_sizes(root, IMAGES_DIR, sizes)


def _check_sizes(root: str, folder: str, sizes: dict[str, int | None]) -> None:
    # the listing carries sizes: empty files and dangling links cost no extra request
    empty = [f"{iid} ({'dangling link' if n is None else 'empty file'})" for iid, n in sizes.items() if not n]
    if empty:
        raise ArchiveError(f"archive {root}: {len(empty)} unreadable image(s) under {folder}/: " + _lines(empty))


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


def _read_csv(source: str, max_rows: int | None = None) -> list[list[str]]:
    """Rows of a CSV (the first ``max_rows``: a header costs one chunk, not the file), read as
    a stream of bounded lines: a line over MAX_LINE_BYTES, bytes that are not UTF-8 or a CSV
    syntax error end with an ArchiveError naming the file and line, without the line ever being
    held whole."""
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
    stream = lines()
    reader = csv.reader(stream)
    try:
        if max_rows is None:
            return list(reader)
        return [row for _, row in zip(range(max_rows), reader)]
    except csv.Error as e:
        raise ArchiveError(f"{source} line {reader.line_num}: {e}") from None
    finally:
        stream.close()  # closes the file now when only the first rows were read


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


# ------------------------------------------------------------------ class lists
# An integer-looking ClassId is an index (ASCII digits: int() would also take "1_0" and "١")
_INT = re.compile(r"[+-]?[0-9]+")


def _resolver(class_names: list[str]):
    """``resolve(value, column)``: the 1-based class id a ClassId/Class value names (a class name,
    else an integer index), or the reason it names none (a string, for the bad-row list)."""
    by_name = {n: k for k, n in enumerate(class_names, 1)}
    c = len(class_names)

    def resolve(value: str, column: str) -> int | str:
        v = value.strip()
        if v in by_name:  # a name first: classes may be named "3"
            return by_name[v]
        if _INT.fullmatch(v):
            k = int(v)
            return k if 1 <= k <= c else f"{column} {k} out of range 1..{c}"
        shown = repr(v) if len(v) <= MAX_CLASS_NAME else repr(v[:MAX_CLASS_NAME]) + "..."  # a line may be MBs
        return f"{column} {shown} is neither a class name ({_names(class_names)}) nor an index 1..{c}"

    return resolve


def _names_beside(source: str) -> list[str] | None:
    """The class names of a wide ``labels.csv`` in the folder of the long CSV ``source``; None
    when there is none (or it is long itself, or not a labels file: it says nothing of classes)."""
    folder, _, name = source.rpartition("/")
    beside = io.join(folder, "labels.csv")
    if name == "labels.csv" or not io.exists(beside):
        return None
    head = _read_csv(beside, max_rows=1)
    header = [h.strip() for h in head[0]] if head else []
    if "ImageId" not in header or _csv_kind(header) != "wide":
        return None
    return _wide_classes(beside, header, None)[0]


def _names_from_rows(source: str, header: list[str], rows, column: str) -> list[str]:
    """The class list a long CSV implies alone: ``class 1``..``class <max id>`` when every id is
    an integer (at least one class), else the sorted names found."""
    if column not in header:
        return _numbered_names(1)  # the parser reports the missing column
    j = header.index(column)
    top, top_line, names = 1, 0, {}
    for line, row in _data_rows(header, rows, []):  # the parser reports bad rows
        v = row[j].strip()
        if not v:
            continue
        if _INT.fullmatch(v):
            if int(v) > top:
                top, top_line = int(v), line
        elif v not in names:
            names[v] = _check_name(f"{source} line {line}: {column}", v)
    if names:
        if len(names) > MAX_CLASSES:
            raise ArchiveError(f"{source}: {len(names)} class names in column {column}, over {MAX_CLASSES}")
        return sorted(names)
    if top > MAX_CLASSES:
        raise ArchiveError(f"{source} line {top_line}: {column} {top}: over {MAX_CLASSES} classes")
    return _numbered_names(top)


_CLASS_COL = re.compile(r"^(?:class[_ ]?)?([0-9]+)$", re.IGNORECASE)


def _wide_classes(source: str, header: list[str], wanted: list[str] | None) -> tuple[list[str], list[int]]:
    """(class names, the column of each class in that order) of a wide labels.csv header: every
    column but ``ImageId`` is a class; numbered columns (``1``, ``class_1``...) are classes
    ``class 1``.. by their number, other headers name their class."""
    if "ImageId" not in header:
        raise ArchiveError(f"{source}: missing column ImageId; found {', '.join(header)}")
    class_cols = [(j, h) for j, h in enumerate(header) if h != "ImageId"]
    if not 1 <= len(class_cols) <= MAX_CLASSES:
        raise ArchiveError(f"{source}: expected 1..{MAX_CLASSES} class columns beside ImageId (one 0/1 column per "
                           f"class), found {len(class_cols)}")
    numbers = {j: int(m.group(1)) for j, h in class_cols if (m := _CLASS_COL.match(h))}
    if numbers and len(numbers) == len(class_cols):
        return _numbered_classes(source, header, numbers, wanted)
    # a named header may name class k "k" (or "class_k"), as synth allows: the number agrees
    # with the position then, and the ClassId k means that class either way
    position = {j: k for k, (j, _) in enumerate(class_cols, 1)}
    if any(position[j] != k for j, k in numbers.items()):
        raise ArchiveError(f"{source}: numbered class columns mixed with named ones ({', '.join(header)}); "
                           "number every class column or name every one (a column named k only as class k)")
    seen: dict[str, int] = {}
    for j, h in class_cols:
        _check_name(f"{source}: column {j + 1}", h)
        if h in seen:
            raise ArchiveError(f"{source}: column {j + 1}: class name {h!r} repeats column {seen[h] + 1}")
        seen[h] = j
    names = [h for _, h in class_cols]
    if wanted is None:
        return names, [j for j, _ in class_cols]
    if set(wanted) != set(names):
        raise ArchiveError(f"{source}: the header's classes ({_names(names)}) are not those of classes= "
                           f"({_names(wanted)})")
    return list(wanted), [seen[n] for n in wanted]


def _numbered_classes(source, header, numbers: dict[int, int], wanted) -> tuple[list[str], list[int]]:
    """Severstal's ``1,2,3,4`` / ``class_1``.. headers: exactly 1..C in any order, mapped by number."""
    c = len(numbers)
    if sorted(numbers.values()) != list(range(1, c + 1)):
        raise ArchiveError(f"{source}: numbered class columns must be 1..{c}, one 0/1 column per class (named "
                           f"1..{c} or class_1..); found {', '.join(header)}")
    if wanted is not None and len(wanted) != c:
        raise ArchiveError(f"{source}: {c} numbered class columns but {len(wanted)} classes= ({_names(wanted)})")
    cols = [j for j, _ in sorted(numbers.items(), key=lambda t: t[1])]
    return (list(wanted) if wanted is not None else _numbered_names(c)), cols


# ------------------------------------------------------------------ CSV rows
def mask_rows(source, header, rows, class_names: list[str], bad: list[str], dup: list[str], keep=None):
    """Yield (line, image id, class id, RLE text or "") of a long CSV's data rows
    (``ImageId,ClassId,EncodedPixels``; ``header`` the stripped first row, ``rows`` the rest).
    ``ClassId`` is a name of ``class_names`` or a 1-based index into it. Rows with a bad class
    id or RLE syntax go to ``bad``, repeated (image, class) pairs to ``dup`` (the caller raises);
    ``keep(line, image_id)`` may drop a row (False) after the id check."""
    missing = [c for c in ("ImageId", "ClassId", "EncodedPixels") if c not in header]
    if missing:
        raise ArchiveError(f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(header)}")
    ci, cc, ce = (header.index(c) for c in ("ImageId", "ClassId", "EncodedPixels"))
    resolve = _resolver(list(class_names))
    seen: dict[tuple[str, int], int] = {}
    for line, row in _data_rows(header, rows, bad):
        image_id = _check_id(source, line, row[ci])
        if keep is not None and not keep(line, image_id):
            continue
        class_id = resolve(row[cc], "ClassId")
        if isinstance(class_id, str):
            bad.append(f"line {line}: {class_id}")
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


def _raise_rows(source: str, bad: list[str], dup: list[str], what: str) -> None:
    if bad:
        raise ArchiveError(f"{source}: {len(bad)} bad row(s): " + _lines(bad))
    if dup:
        raise ArchiveError(f"{source}: {len(dup)} duplicate {what} row(s): " + _lines(dup))


def _parse_long(source, header, rows, class_names):
    """train.csv: ImageId,ClassId,EncodedPixels; one row per (image, defect class)."""
    c = len(class_names)
    listed: dict[str, int] = {}
    labels: dict[str, np.ndarray] = {}
    rles: dict[tuple[str, int], tuple[str, int]] = {}
    bad, dup = [], []
    n_with, n_without = 0, 0
    for line, image_id, class_id, text in mask_rows(source, header, rows, class_names, bad, dup):
        if text:
            n_with += 1
            rles[(image_id, class_id)] = (text, line)
        else:
            n_without += 1
        listed.setdefault(image_id, line)
        labels.setdefault(image_id, np.zeros(c, dtype=np.uint8))[class_id - 1] = 1
    _raise_rows(source, bad, dup, "(ImageId, ClassId)")
    if n_with and n_without:
        raise ArchiveError(
            f"{source}: {n_without} row(s) have empty EncodedPixels and {n_with} do not; a file holds "
            "either masks for every row or image-level labels only"
        )
    return listed, labels, rles, n_with > 0


def _parse_class_rows(source, header, rows, class_names):
    """Long labels CSV: ImageId,Class; one row per (image, present class). A row with an empty
    Class lists a clean image (for archives read without their image folder)."""
    ci, cc = header.index("ImageId"), header.index("Class")
    resolve = _resolver(class_names)
    listed: dict[str, int] = {}
    labels: dict[str, np.ndarray] = {}
    seen: dict[tuple[str, int], int] = {}
    bad, dup = [], []
    for line, row in _data_rows(header, rows, bad):
        image_id = _check_id(source, line, row[ci])
        lab = labels.setdefault(image_id, np.zeros(len(class_names), dtype=np.uint8))
        listed.setdefault(image_id, line)
        if not row[cc].strip():
            continue
        class_id = resolve(row[cc], "Class")
        if isinstance(class_id, str):
            bad.append(f"line {line}: {class_id}")
        elif (image_id, class_id) in seen:
            dup.append(f"lines {seen[(image_id, class_id)]} and {line}: ({image_id}, {class_id})")
        else:
            seen[(image_id, class_id)] = line
            lab[class_id - 1] = 1
    _raise_rows(source, bad, dup, "(ImageId, Class)")
    return listed, labels


def _parse_wide(source, header, rows, cols: list[int]):
    """labels.csv: ImageId plus one 0/1 column per class (``cols``, in class order); one row per image."""
    ci = header.index("ImageId")
    listed: dict[str, int] = {}
    labels: dict[str, np.ndarray] = {}
    bad, dup = [], []
    for line, row in _data_rows(header, rows, bad):
        image_id = _check_id(source, line, row[ci])
        if image_id in listed:
            dup.append(f"lines {listed[image_id]} and {line}: {image_id}")
            continue
        vals = [row[j].strip() for j in cols]
        if any(v not in ("0", "1") for v in vals):
            bad.append(f"line {line}: class columns must be 0 or 1, got {vals}")
            continue
        listed[image_id] = line
        labels[image_id] = np.array([int(v) for v in vals], dtype=np.uint8)
    _raise_rows(source, bad, dup, "ImageId")
    return listed, labels


# ------------------------------------------------------------------ folder per class
def _open_class_folders(root: str, wanted: list[str] | None, clean: str, strict_images: bool) -> dict:
    """``Archive`` fields (but ``root``) of ``images/<class>/...`` (and ``ground_truth/``): each
    image has exactly its folder's class, those in the ``clean`` folder none."""
    images = io.join(root, CLASS_IMAGES_DIR)
    try:
        sizes = io.list_image_sizes(images)
    except (FileNotFoundError, NotADirectoryError):
        raise ArchiveError(f"archive {root}: {images} is not a folder of class folders") from None
    loose = [k for k in sizes if "/" not in k]
    if loose:
        raise ArchiveError(f"{images}: {len(loose)} image(s) outside any class folder (expected "
                           f"{CLASS_IMAGES_DIR}/<class>/<file>, clean ones in {clean}/): " + _lines(loose))
    # empty class folders are classes too: the listing of images alone would not show them
    folders = sorted(set(_subfolders(images)) | {k.split("/", 1)[0] for k in sizes})
    names = _folder_classes(images, folders, wanted, clean)
    if strict_images:
        _check_sizes(root, CLASS_IMAGES_DIR, sizes)
    image_ids = [_check_key(images, k) for k in sorted(sizes)]
    by_name = {n: k for k, n in enumerate(names)}
    labels = np.zeros((len(image_ids), len(names)), dtype=np.uint8)
    for i, iid in enumerate(image_ids):
        folder = iid.split("/", 1)[0]
        if folder != clean:
            labels[i, by_name[folder]] = 1
    truth = io.join(root, GROUND_TRUTH_DIR)
    has_masks = io.exists(truth)
    return dict(source=images, image_ids=image_ids, labels=labels, has_masks=has_masks, class_names=names,
                images_dir=CLASS_IMAGES_DIR, _mask_files=_find_masks(truth, image_ids, labels) if has_masks else {})


def _subfolders(url: str) -> list[str]:
    """Names of the folders directly inside ``url``, hidden ones (and macOS zip debris) left out
    as the image listing leaves out hidden files."""
    fs, path = io.filesystem(url, fresh=True)
    entries = fs.ls(path.rstrip("/"), detail=True)
    names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
    return [n for n in names if not n.startswith(".") and n != "__MACOSX"]


def _folder_classes(images: str, folders: list[str], wanted: list[str] | None, clean: str) -> list[str]:
    """The class list of a folder-per-class archive: ``wanted`` (every folder must be one of them
    or the clean one), else the sorted folder names but the clean one."""
    others = [_check_name(f"{images}/{f}/", f) for f in folders if f != clean]
    if wanted is None:
        if not others:
            raise ArchiveError(f"{images}: no class folders besides {clean}/ (expected "
                               f"{CLASS_IMAGES_DIR}/<class>/<file>)")
        if len(others) > MAX_CLASSES:
            raise ArchiveError(f"{images}: {len(others)} class folders, over {MAX_CLASSES}")
        return sorted(others)
    if clean in wanted:
        raise ArchiveError(f"classes= names the clean folder {clean!r} as a class; pass clean= another name")
    unknown = [f for f in others if f not in wanted]
    if unknown:
        raise ArchiveError(f"{images}: folder(s) {_names(unknown)} are neither classes= ({_names(wanted)}) nor "
                           f"the clean folder {clean!r}")
    return list(wanted)


def _check_key(where: str, key: str) -> str:
    try:
        return io.check_key(key)
    except ValueError as e:
        raise ArchiveError(f"{where}: bad image path: {e}") from None


def _find_masks(truth: str, image_ids: list[str], labels: np.ndarray) -> dict[str, tuple[str, int]]:
    """image id -> (mask key under the root, class id) for every image of a defect class: its
    ``ground_truth/<class>/<stem>_mask.png`` (only listed here; masks are read when asked for).
    ArchiveError for defect images without a mask and masks without a defect image."""
    try:
        listed = io.list_image_sizes(truth, extensions=(".png",))
    except NotADirectoryError:
        raise ArchiveError(f"{truth} is a file, not a folder of <class>/<stem>{MASK_SUFFIX}.png masks") from None
    by_stem = {k[:-4]: k for k in listed}  # "scratch/000_mask" -> "scratch/000_mask.png" (or .PNG)
    out: dict[str, tuple[str, int]] = {}
    owner: dict[str, str] = {}
    missing, shared = [], []
    for iid, lab in zip(image_ids, labels):
        if not lab.any():
            continue
        stem = posixpath.splitext(iid)[0] + MASK_SUFFIX
        if stem in owner:  # a.png and a.jpg would share one mask
            shared.append(f"{owner[stem]} and {iid}")
        elif stem not in by_stem:
            missing.append(f"{iid} (no {GROUND_TRUTH_DIR}/{stem}.png)")
        else:
            owner[stem] = iid
            out[iid] = (f"{GROUND_TRUTH_DIR}/{by_stem[stem]}", int(lab.argmax()) + 1)
    if shared:
        raise ArchiveError(f"{truth}: {len(shared)} pair(s) of images share one mask file name: " + _lines(shared))
    if missing:
        raise ArchiveError(f"{truth}: {len(missing)} image(s) of a defect class have no mask file: "
                           + _lines(missing))
    orphans = sorted(by_stem[s] for s in by_stem if s not in owner)
    if orphans:
        raise ArchiveError(f"{truth}: {len(orphans)} mask file(s) with no image of a defect class under "
                           f"{CLASS_IMAGES_DIR}/ (masks are <class>/<stem>{MASK_SUFFIX}.png): " + _lines(orphans))
    return out


def _decode_mask(data: bytes) -> np.ndarray:
    """``bool[H, W]``, True where a mask PNG is non-zero (not black): grey, RGB, palette or 1-bit
    through :func:`io.decode_image`; 16-bit, float and transparent masks, which that refuses as
    images, with Pillow directly under the same pixel limit (transparent pixels are not mask)."""
    try:
        arr = io.decode_image(data)
    except io.ImageDecodeError as first:
        try:
            return _decode_mask_pillow(data)
        except Exception:  # noqa: BLE001 -- the first reason is the one to report
            raise first from None
    return arr.any(axis=2) if arr.ndim == 3 else arr != 0


def _decode_mask_pillow(data: bytes) -> np.ndarray:
    from PIL import Image

    img = Image.open(BytesIO(data))
    io._check_pixels(*img.size, io.DEFAULT_MAX_PIXELS)  # before any pixel is decoded
    img.load()
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        return (rgba[..., 3] != 0) & rgba[..., :3].any(axis=2)
    arr = np.asarray(img)
    return arr.any(axis=2) if arr.ndim == 3 else arr != 0


def iter_class_masks(archive: Archive, limit: int | None = None, shape: tuple[int, int] | None = None):
    """Yield (class id, ``bool[H, W]``) for every true mask of the first ``limit`` defective images.
    ``shape``: the size of every image, for callers that know the archive has one (saves a
    header read per image); None: each image's own size."""
    ids = [iid for iid, d in zip(archive.image_ids, archive.defective) if d][:limit]
    for image_id in ids:
        masks = archive.masks(image_id, shape)
        for c in range(archive.num_classes):
            if masks[c].any():
                yield c + 1, masks[c]
