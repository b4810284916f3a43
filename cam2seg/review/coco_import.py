"""Reviewed COCO files back in: CVAT's or Label Studio's export after review -> a masks file.

:func:`parse_coco` reads a COCO instance-segmentation dict (https://cocodataset.org/#format-data)
against an archive's image ids and classes and returns each reviewed image's masks;
:func:`import_coco` does the I/O around it and writes the masks file
(:mod:`cam2seg.truemasks`). What is accepted:

* ``segmentation`` as polygons (a list of flat ``[x1, y1, ...]`` outlines, rasterised by
  pycocotools, which CVAT and Datumaro use too: a pixel is in when its centre is; the outlines
  :mod:`cam2seg.review.coco` writes follow pixel edges, so they come back exactly, holes filled),
  or as RLE, uncompressed (``counts`` a list) or compressed (``counts`` a string), with
  ``iscrowd`` 0 or 1 either way. Several annotations of one class on one image are unioned.
* Categories are matched to classes by name ("class 3", "class_3", "3", as the export and
  Datumaro write them) or through ``categories`` (``{name or COCO id: class id}``), which wins.
* Image ``file_name`` is matched to an ImageId exactly, else by its path ending in "/ImageId",
  else by a unique base name; ``height`` and ``width``, when given, must be the archive image's.
* Images without annotations are reviewed-clean only when the file says so: the image's
  ``cam2seg_reviewed`` is true, or ``info.cam2seg_reviewed`` is "all", or the caller passes
  ``unannotated="clean"``; otherwise they are left out (not covered).

Everything in the file is untrusted: its size is capped (``max_bytes``), and every problem
raises :class:`CocoError` naming the annotation (or image, or category). RLE counts are checked
here before pycocotools sees them (its C decoder does not check them against the image size).
"""

from __future__ import annotations

import functools
import json
import math
import posixpath
import re
import warnings
from collections.abc import Callable, Mapping

import numpy as np

from .. import io, rle

__all__ = ["CocoError", "MAX_COCO_BYTES", "parse_coco", "import_coco", "string_counts"]

MAX_COCO_BYTES = 256 * 1024 * 1024
_CLASS_NAME = re.compile(r"^\s*(?:class[_ ]?)?(\d+)\s*$", re.IGNORECASE)
_EDGE_TOLERANCE = 1e-3  # pixels: float noise on a vertex at the image's border is not "outside"


class CocoError(ValueError):
    """A COCO file that cannot be imported; the message names the file and the item."""


def string_counts(text: str) -> list[int]:
    """COCO's compressed RLE string -> its counts (pycocotools' ``rleFrString``, in Python, so a
    hostile string is refused before it reaches C): 5 bits a character (offset 48), 0x20 means
    "more follows", 0x10 on the last one is the sign; counts after the second are differences
    from the count two before."""
    counts: list[int] = []
    i, n = 0, len(text)
    while i < n:
        value, shift, more = 0, 0, True
        while more:
            if i >= n:
                raise ValueError("truncated RLE string")
            c = ord(text[i]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"bad character {text[i]!r} in RLE string")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            i += 1
            shift += 1
            if shift > 13:
                raise ValueError("RLE count too long")
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _counts_mask(counts, h: int, w: int) -> np.ndarray:
    """COCO RLE counts (column-major, zeros first) -> ``bool[h, w]``, after checking them."""
    c = np.asarray(counts)
    if c.ndim != 1 or c.size == 0 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError("RLE counts must be a non-empty list of integers")
    if (c < 0).any():
        raise ValueError("RLE counts must not be negative")
    if int(c.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(c.sum())}, the image has {h * w} pixels")
    values = np.arange(c.size) % 2 == 1
    return np.repeat(values, c).reshape(w, h).T


def _polygon_mask(polygons, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as coco_mask

    if not isinstance(polygons, list) or not polygons:
        raise ValueError("segmentation must be a non-empty list of polygons or an RLE dict")
    clean = []
    for p in polygons:
        if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
            raise ValueError("each polygon must be a flat list of at least 3 x, y pairs")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p):
            raise ValueError("polygon coordinates must be finite numbers")
        xs, ys = np.asarray(p[0::2], np.float64), np.asarray(p[1::2], np.float64)
        if xs.min() < -_EDGE_TOLERANCE or ys.min() < -_EDGE_TOLERANCE or xs.max() > w + _EDGE_TOLERANCE \
                or ys.max() > h + _EDGE_TOLERANCE:
            raise ValueError(f"polygon outside the {w}x{h} image (x {xs.min():g}..{xs.max():g}, "
                             f"y {ys.min():g}..{ys.max():g})")
        clean.append([float(v) for v in p])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycocotools' own numpy-2 deprecation warnings
        return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(clean, h, w))).astype(bool)


def _segmentation_mask(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, dict):
        size = seg.get("size")
        if size is None or [int(v) for v in size] != [h, w]:
            raise ValueError(f"RLE size {size} is not the image's [{h}, {w}]")
        counts = seg.get("counts")
        if isinstance(counts, str):
            counts = string_counts(counts)
        elif not isinstance(counts, list):
            raise ValueError("RLE counts must be a list of integers or a compressed string")
        return _counts_mask(counts, h, w)
    return _polygon_mask(seg, h, w)


def _class_of_categories(doc: dict, class_ids, categories: Mapping | None, class_names=None) -> dict:
    """COCO category id -> class id (or the reason it has none, for the error message). A
    category matches a class by the user's mapping, by the class's name (``class_names``, in
    ``class_ids`` order; case and surrounding blanks ignored) or by a name like "class 3"."""
    given = {str(k).strip(): int(v) for k, v in (categories or {}).items()}
    by_name = {str(n).strip().casefold(): int(c) for c, n in zip(class_ids, class_names or [])}
    bad = sorted({v for v in given.values() if v not in class_ids})
    if bad:
        raise CocoError(f"category mapping names class(es) {bad}, not among {list(class_ids)}")
    out = {}
    for cat in doc.get("categories") or []:
        if not isinstance(cat, dict) or "id" not in cat:
            raise CocoError(f"a category without an id: {str(cat)[:80]}")
        name = str(cat.get("name", ""))
        if name.strip() in given:
            out[cat["id"]] = given[name.strip()]
        elif str(cat["id"]) in given:
            out[cat["id"]] = given[str(cat["id"])]
        elif name.strip().casefold() in by_name:
            out[cat["id"]] = by_name[name.strip().casefold()]
        elif (m := _CLASS_NAME.match(name)) and int(m.group(1)) in class_ids:
            out[cat["id"]] = int(m.group(1))
        else:
            known = list(class_names) if class_names else list(class_ids)
            out[cat["id"]] = f"category {cat['id']} ({name!r}) is not one of the classes {known}"
    return out


def _match_images(images, image_ids) -> dict[str, str]:
    """file name -> ImageId for the names that match (see the module docstring)."""
    known = set(image_ids)
    by_base: dict[str, list[str]] = {}
    for i in image_ids:
        by_base.setdefault(posixpath.basename(i), []).append(i)
    out = {}
    for name in images:
        n = name.replace("\\", "/").lstrip("./")
        if n in known:
            out[name] = n
            continue
        tail = [i for i in (n.split("/", k)[-1] for k in range(1, n.count("/") + 1)) if i in known]
        if tail:
            out[name] = tail[0]
        elif len(by_base.get(posixpath.basename(n), [])) == 1:
            out[name] = by_base[posixpath.basename(n)][0]
    return out


def parse_coco(doc, image_ids, class_ids, shape_of: Callable[[str], tuple[int, int]] | None = None, *,
               categories: Mapping | None = None, unannotated: str = "skip", source: str = "COCO file",
               class_names=None) -> dict:
    """A COCO dict -> ``{"masks": {image id: {class id: bool[H, W]}}, "clean": [image ids],
    "skipped": [image ids], "annotations": n}`` (pure: no I/O).

    ``image_ids`` / ``class_ids`` / ``class_names``: the archive's; ``shape_of``: ImageId -> (height, width) of the
    archive's image, asked once per annotated image (None: trust the file's sizes). ``masks`` holds the non-empty masks of each
    annotated image; ``clean`` the reviewed images without any annotation (see the module
    docstring); ``skipped`` the unannotated images left out.
    """
    if unannotated not in ("skip", "clean"):
        raise ValueError(f"unannotated must be skip or clean, got {unannotated!r}")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations", []), list):
        raise CocoError(f"{source}: not a COCO instance file (needs an 'images' list and an 'annotations' list)")
    class_ids = [int(c) for c in class_ids]
    cats = _class_of_categories(doc, class_ids, categories, class_names)
    names = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise CocoError(f"{source}: an image without an id or file_name: {str(im)[:80]}")
        if im["id"] in names:
            raise CocoError(f"{source}: image id {im['id']} is used twice")
        names[im["id"]] = im
    matched = _match_images([im["file_name"] for im in names.values()], image_ids)
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    all_reviewed = unannotated == "clean" or info.get("cam2seg_reviewed") == "all"

    def image_of(ann_text: str, coco_id):
        im = names.get(coco_id)
        if im is None:
            raise CocoError(f"{source}: {ann_text}: image id {coco_id} is not in the file's images")
        image_id = matched.get(im["file_name"])
        if image_id is None:
            raise CocoError(f"{source}: {ann_text}: image {im['file_name']!r} is not in the archive")
        h, w = shape_of(image_id) if shape_of is not None else (int(im.get("height", 0)), int(im.get("width", 0)))
        if ("height" in im and int(im["height"]) != h) or ("width" in im and int(im["width"]) != w) or h <= 0 or w <= 0:
            raise CocoError(f"{source}: {ann_text}: image {im['file_name']!r} is {im.get('width')}x{im.get('height')} "
                            f"in the file, {w}x{h} in the archive")
        return image_id, (h, w)

    masks: dict[str, dict[int, np.ndarray]] = {}
    seen_ids = set()
    for ann in doc.get("annotations", []):
        if not isinstance(ann, dict) or "id" not in ann:
            raise CocoError(f"{source}: an annotation without an id: {str(ann)[:80]}")
        text = f"annotation {ann['id']}"
        if ann["id"] in seen_ids:
            raise CocoError(f"{source}: {text}: the annotation id is used twice")
        seen_ids.add(ann["id"])
        cls = cats.get(ann.get("category_id"), f"category {ann.get('category_id')} is not in the file's categories")
        if isinstance(cls, str):
            raise CocoError(f"{source}: {text}: {cls} (map it with --category NAME=CLASS)")
        image_id, (h, w) = image_of(text, ann.get("image_id"))
        if "segmentation" not in ann:
            raise CocoError(f"{source}: {text}: no segmentation")
        try:
            m = _segmentation_mask(ann["segmentation"], h, w)
        except (ValueError, TypeError, OverflowError) as e:
            raise CocoError(f"{source}: {text} (image {image_id!r}): {e}") from None
        per = masks.setdefault(image_id, {})
        per[cls] = per[cls] | m if cls in per else m
    clean, skipped = [], []
    for im in names.values():
        image_id = matched.get(im["file_name"])
        if image_id is None:
            raise CocoError(f"{source}: image {im['file_name']!r} (id {im['id']}) is not in the archive")
        if image_id in masks:
            continue
        (clean if all_reviewed or im.get("cam2seg_reviewed") is True else skipped).append(image_id)
    masks = {i: {c: m for c, m in per.items() if m.any()} for i, per in masks.items()}
    return {"masks": masks, "clean": sorted(set(clean)), "skipped": sorted(set(skipped)),
            "annotations": len(seen_ids)}


def import_coco(coco_url: str, archive_url: str, out_url: str, *, categories: Mapping | None = None,
                unannotated: str = "skip", force: bool = False, max_bytes: int = MAX_COCO_BYTES) -> dict:
    """Read the COCO file at ``coco_url`` against the archive at ``archive_url`` and write its
    masks as a masks file at ``out_url`` (:mod:`cam2seg.truemasks`). Refuses to write over the
    archive's own CSV files, and over an existing ``out_url`` unless ``force``. Returns a
    summary dict (images covered, positive masks, clean and skipped images, annotations)."""
    from ..archive import Archive

    coco_url, out_url = io.absolute(coco_url), io.absolute(out_url)
    archive = Archive.open(archive_url)
    if out_url in (io.join(archive.root, "train.csv"), io.join(archive.root, "labels.csv"), archive.source):
        raise ValueError(f"{out_url} is the archive's own labels file: write the reviewed masks to a new file "
                         "and pass it as --true-masks / --truth")
    if io.exists(out_url) and not force:
        raise FileExistsError(f"{out_url} exists; pass --force to replace it")
    io.check_writable_parent(out_url)
    fs, path = io.filesystem(coco_url)
    with fs.open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise CocoError(f"{coco_url}: larger than {max_bytes} bytes; refused")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CocoError(f"{coco_url}: not a JSON file ({e})") from None
    # one header read per annotated image (its size), however many annotations it has
    parsed = parse_coco(doc, archive.image_ids, archive.class_ids, functools.lru_cache(maxsize=None)(archive.image_shape),
                        categories=categories, unannotated=unannotated, source=coco_url,
                        class_names=list(archive.class_names))
    from ..truemasks import masks_csv

    out = {i: {c: rle.encode(m) for c, m in per.items()} for i, per in parsed["masks"].items()}
    out.update({i: {} for i in parsed["clean"]})
    io.write_bytes(out_url, masks_csv(out, archive.class_ids).encode())
    return {"out": out_url, "images": len(out), "masks": sum(len(v) for v in out.values()),
            "clean": len(parsed["clean"]), "skipped": len(parsed["skipped"]), "annotations": parsed["annotations"]}
