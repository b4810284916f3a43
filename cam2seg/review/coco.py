"""Pseudo-masks as a COCO instance-segmentation file, for review in CVAT or Label Studio.

A label store holds one row per (image, class), empty masks included (:mod:`cam2seg.store`).
:func:`build_coco` turns such rows into a COCO dict (https://cocodataset.org/#format-data):
one *image* per stored image, one *category* per class, one *annotation* per non-empty
(image, class) mask. Images come lowest-confidence first (:func:`image_confidence`), so a
reviewer who stops after the first N has seen the N decisions most worth a second look.

Conventions:

* Pixel coordinates are COCO's: pixel ``(row r, column c)`` is the unit square
  ``[c, c+1] x [r, r+1]``, so its centre is ``(c + 0.5, r + 0.5)``; ``bbox`` is
  ``[x, y, width, height]`` of those squares, ``area`` the mask's pixel count.
* ``fmt="polygon"``: ``segmentation`` is a list of flat ``[x1, y1, x2, y2, ...]`` outlines,
  ``iscrowd = 0``. Outlines follow pixel *edges* (not pixel centres, where
  ``cv2.findContours`` puts them), so they rasterise back to exactly the mask's pixels, a
  one-pixel-wide streak or a single pixel included. COCO polygons are unioned and cannot
  express holes: background enclosed by the mask is filled (use ``fmt="rle"`` to keep it).
* ``fmt="rle"``: ``segmentation`` is COCO's *uncompressed* RLE ``{"size": [h, w], "counts":
  [...]}``: column-major like the store's Kaggle RLE, counts alternate zeros and ones and start
  with the zeros; ``iscrowd = 1``, as COCO ties RLE segmentations to crowd annotations. Exact.
* Image ``id`` is the review rank (1 = review first). Label Studio's COCO converter orders
  its tasks by image id, so the id carries the review order there; CVAT matches images by
  ``file_name`` (the store's ``image_id``, the key relative to the images prefix).

:func:`export_coco` is the only function here that does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import cv2
import numpy as np
import pyarrow as pa

from .. import __version__, io, rle, store
from ..classes import default_names

__all__ = ["FORMATS", "ORDERS", "REQUIRED_COLUMNS", "mask_to_polygons", "mask_to_coco_rle", "mask_bbox",
           "mask_area", "mask_annotation", "image_confidence", "build_coco", "export_coco"]

FORMATS = ("polygon", "rle")
ORDERS = ("confidence", "id")
REQUIRED_COLUMNS = ("image_id", "class_id", "encoded_pixels", "score", "height", "width")
SUPERCATEGORY = "defect"
_ROUND = 6  # decimals kept for scores in the JSON: float32 noise is not information


def _check_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``bool[H, W]`` -> COCO ``(x, y, width, height)`` of its pixels, or None when empty."""
    mask = _check_mask(mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def mask_area(mask: np.ndarray) -> int:
    """Pixel count of a ``bool[H, W]`` mask (COCO's ``area`` for a mask)."""
    return int(np.count_nonzero(_check_mask(mask)))


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer outlines of ``bool[H, W]``, one flat ``[x1, y1, x2, y2, ...]`` list (float COCO
    pixel coordinates) per 8-connected component; ``[]`` for an empty mask.

    ``cv2.findContours`` traces pixel *centres*: a polygon through them loses half a pixel all
    round when rasterised, and a one-pixel-wide streak comes out as a 2-point line that
    COCO tools drop (CVAT's importer refuses polygons under 3 points). So the tracing runs on
    the mask's closure in a doubled grid of size (2H+1, 2W+1), where even indices are pixel
    corners and edges and odd ones pixel centres: every pixel becomes a 3x3 block whose
    border lies on the pixel's edges. Its contour, halved, follows pixel edges exactly and
    has at least 4 points, whatever the shape. Only outer contours are kept: COCO polygons
    are unioned, so holes cannot be expressed and are filled. Pixels touching only at a
    corner share an outline (it touches itself at that corner), matching 8-connectivity.
    CHAIN_APPROX_SIMPLE keeps only the vertices where the outline turns: faithful and small.
    """
    mask = _check_mask(mask)
    box = mask_bbox(mask)
    if box is None:
        return []
    x0, y0, w, h = box
    crop = mask[y0 : y0 + h, x0 : x0 + w]  # the trace costs grid size: work on the mask's box only
    # One padding cell all round, so nothing touches the border of the traced image.
    grid = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    grid[2 : 2 * h + 1 : 2, 2 : 2 * w + 1 : 2] = crop
    grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))  # pixel centres -> closed unit squares
    contours, _ = cv2.findContours(grid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:  # cannot happen on the closure; kept as the documented contract
            continue
        # grid index g (padded by 1) is COCO coordinate (g - 1) / 2 within the box
        pts = (pts - 1.0) / 2.0 + np.array([x0, y0], np.float64)
        polygons.append(pts.ravel().tolist())
    return polygons


def _kaggle_to_coco_counts(encoded: str, height: int, width: int) -> list[int]:
    """A Kaggle RLE string (1-based ``start length`` pairs, column-major) -> COCO counts."""
    starts, lengths = rle.runs(encoded, height, width)
    total = height * width
    if starts.size == 0:
        return [total]
    begins = starts - 1  # 0-based first pixel of each run
    ends = begins + lengths  # 0-based one past its last pixel
    counts = np.empty(2 * starts.size, np.int64)
    counts[0::2] = begins - np.concatenate([[0], ends[:-1]])  # zeros before each run
    counts[1::2] = lengths
    out = counts.tolist()
    if ends[-1] < total:
        out.append(int(total - ends[-1]))  # trailing zeros: counts sum to H*W
    return out


def mask_to_coco_rle(mask: np.ndarray) -> dict:
    """``bool[H, W]`` -> COCO uncompressed RLE ``{"size": [H, W], "counts": [ints]}``.

    Column-major (as COCO and the store's Kaggle RLE both are); counts alternate runs of 0s
    and 1s starting with 0s (so the first count is 0 when pixel (0, 0) is set) and sum to
    H*W. Via :func:`cam2seg.rle.encode`, so runs are canonical (never two adjacent).
    """
    mask = _check_mask(mask)
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": _kaggle_to_coco_counts(rle.encode(mask), h, w)}


def mask_annotation(mask: np.ndarray, fmt: str = "polygon") -> dict | None:
    """The geometry keys of one COCO annotation (``segmentation``, ``area``, ``bbox``,
    ``iscrowd``) for ``bool[H, W]``, or None for an empty mask (COCO has no empty objects)."""
    _check_fmt(fmt)
    mask = _check_mask(mask)
    box = mask_bbox(mask)
    if box is None:
        return None
    geometry = {"area": float(mask_area(mask)), "bbox": [float(v) for v in box]}
    if fmt == "polygon":
        polygons = mask_to_polygons(mask)
        if polygons:
            return {"segmentation": polygons, **geometry, "iscrowd": 0}
        # Unreachable for a non-empty mask (see mask_to_polygons); should it ever happen,
        # the mask still reaches the reviewer, exactly, as RLE.
    return {"segmentation": mask_to_coco_rle(mask), **geometry, "iscrowd": 1}


def image_confidence(scores, gate=0.5) -> float:
    """How sure the decisions taken for one image are: ``scores float[C]`` (class scores in
    [0, 1]) and ``gate`` (scalar or ``float[C]``, the keep threshold) -> a float in [0.5, 1].

    Per class the decision is "mask kept" when score >= gate, else "dropped"; its confidence
    maps the score's distance from the gate to [0.5, 1]: 0.5 at the gate, 1 at 0 or 1,
    linearly on each side. For gate 0.5 this is ``max(score, 1 - score)``. The image's
    confidence is the least confident of its decisions (min over classes), so an image with
    any class near the gate sorts first for review. No classes: 1.0 (nothing was decided).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = np.broadcast_to(np.asarray(gate, dtype=np.float64), s.shape)
    if np.any((g <= 0) | (g >= 1)):
        raise ValueError(f"gate must lie strictly between 0 and 1, got {gate}")
    if s.size == 0:
        return 1.0
    if np.any(~np.isfinite(s)) or np.any((s < 0) | (s > 1)):
        raise ValueError(f"scores must lie in [0, 1], got {s.tolist()}")
    above = 0.5 + 0.5 * (s - g) / (1 - g)
    below = 0.5 + 0.5 * (g - s) / g
    return float(np.min(np.where(s >= g, above, below)))


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _check_options(fmt: str, order: str, limit) -> None:
    _check_fmt(fmt)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


def _categories(class_ids: Sequence[int], class_names: Sequence[str] | None = None) -> list[dict]:
    """COCO categories: one per class id, named by ``class_names`` (in ``class_ids`` order; None:
    "class <id>")."""
    ids = [int(c) for c in class_ids]
    if class_names is not None and len(class_names) != len(ids):
        raise ValueError(f"{len(class_names)} class names for {len(ids)} class ids")
    if not ids:
        raise ValueError("class_ids is empty: COCO needs at least one category")
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_ids has duplicates: {ids}")
    if min(ids) < 1:
        # COCO category ids start at 1; CVAT's importer (Datumaro) reads id 0 as "no label".
        raise ValueError(f"class ids must be >= 1 for COCO, got {sorted(ids)}")
    names = dict(zip(ids, class_names if class_names is not None else default_names(ids)))
    return [{"id": c, "name": names[c], "supercategory": SUPERCATEGORY} for c in sorted(ids)]


def _group_images(rows: list[dict], known: set[int]) -> dict[str, list[dict]]:
    """Store rows -> image_id -> its rows; checks the invariants the export relies on."""
    images: dict[str, list[dict]] = {}
    for r in rows:
        images.setdefault(r["image_id"], []).append(r)
    unknown = sorted({int(r["class_id"]) for r in rows} - known)
    if unknown:
        raise ValueError(f"table has class ids {unknown} that are not in class_ids {sorted(known)}")
    for image_id, rs in images.items():
        if not image_id:
            raise ValueError("table has a row with an empty image_id")
        classes = [int(r["class_id"]) for r in rs]
        if len(set(classes)) != len(classes):
            raise ValueError(f"image {image_id!r} has several rows for one class: {sorted(classes)} "
                             "(pass the newest row per (image, class), as store.read_masks returns)")
        if len({(int(r["height"]), int(r["width"])) for r in rs}) != 1:
            raise ValueError(f"image {image_id!r} has rows of different sizes")
    return images


def build_coco(table: pa.Table, class_ids: Sequence[int], *, fmt: str = "polygon", order: str = "confidence",
               limit: int | None = None, include_empty_images: bool = True, gate=0.5,
               class_names: Sequence[str] | None = None) -> dict:
    """Label store rows -> a COCO instance-segmentation dict (pure: no I/O).

    ``table``: rows with at least :data:`REQUIRED_COLUMNS` (as :func:`cam2seg.store.read_masks`
    returns: one row per (image, class), empty masks included); ``model_version`` is listed
    in ``info`` when present. ``class_ids``: the categories, a superset of the table's classes;
    ``class_names``: their names in the same order (None: "class <id>").
    ``fmt``: "polygon" or "rle" (see the module docstring). ``order``: "confidence" (lowest
    :func:`image_confidence` first, ties by image_id) or "id" (by image_id). ``limit``: keep
    the first N images after ordering (None: all). ``include_empty_images``: also list
    images with no mask at all, so a reviewer can check the negatives (they are dropped
    before ``limit`` counts when False). ``gate``: the score threshold each class decision
    was taken at, scalar or one per class in ``class_ids`` order.

    Images: ``id`` = review rank (1-based), ``file_name`` = image_id, ``height``, ``width``,
    plus ``cam2seg_rank``, ``cam2seg_confidence`` and ``cam2seg_scores`` ({class id as a
    string: score}, every class, so dropped masks' near misses are visible). Annotations: one
    per non-empty (image, class) mask, ids 1.. in image order then class order, with
    ``score`` = the row's score.
    """
    _check_options(fmt, order, limit)
    if not isinstance(table, pa.Table):
        raise ValueError(f"table must be a pyarrow Table, got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"table is missing required column(s): {', '.join(missing)} "
                         f"(needs {', '.join(REQUIRED_COLUMNS)})")
    categories = _categories(class_ids, class_names)
    cat_ids = [c["id"] for c in categories]
    g = np.asarray(gate, dtype=np.float64).reshape(-1)
    if g.size not in (1, len(cat_ids)):
        raise ValueError(f"gate: {g.size} values for {len(cat_ids)} classes")
    gate_of = dict(zip(cat_ids, np.broadcast_to(g, (len(cat_ids),)).tolist()))

    columns = [*REQUIRED_COLUMNS] + (["model_version"] if "model_version" in table.column_names else [])
    rows = table.select(columns).to_pylist()
    images = _group_images(rows, set(cat_ids))

    entries = []
    for image_id, rs in images.items():
        rs.sort(key=lambda r: int(r["class_id"]))
        scores = [float(r["score"]) for r in rs]
        try:
            conf = image_confidence(scores, [gate_of[int(r["class_id"])] for r in rs])
        except ValueError as e:
            raise ValueError(f"image {image_id!r}: {e}") from None
        has_mask = any(bool(r["encoded_pixels"]) for r in rs)
        entries.append((image_id, conf, has_mask, rs))
    if order == "confidence":
        entries.sort(key=lambda e: (e[1], e[0]))
    else:
        entries.sort(key=lambda e: e[0])
    if not include_empty_images:
        entries = [e for e in entries if e[2]]
    if limit is not None:
        entries = entries[: int(limit)]

    coco_images, annotations = [], []
    for rank, (image_id, conf, _, rs) in enumerate(entries, start=1):
        h, w = int(rs[0]["height"]), int(rs[0]["width"])
        coco_images.append({
            "id": rank, "file_name": image_id, "height": h, "width": w,
            "cam2seg_rank": rank, "cam2seg_confidence": round(conf, _ROUND),
            "cam2seg_scores": {str(int(r["class_id"])): round(float(r["score"]), _ROUND) for r in rs},
        })
        for r in rs:
            if not r["encoded_pixels"]:
                continue
            try:
                mask = rle.decode(r["encoded_pixels"], h, w)
            except rle.RLEError as e:
                raise rle.RLEError(f"image {image_id!r}, class {r['class_id']}: {e}") from None
            geometry = mask_annotation(mask, fmt)
            if geometry is None:  # a string of runs that encodes nothing cannot pass rle.runs; guard anyway
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": rank, "category_id": int(r["class_id"]),
                                **geometry, "score": round(float(r["score"]), _ROUND)})

    versions = sorted({r["model_version"] for r in rows if r.get("model_version")})
    what = "lowest-confidence first" if order == "confidence" else "in image id order"
    info = {
        "description": f"cam2seg pseudo-masks for review, {what}",
        "version": __version__, "contributor": "cam2seg", "cam2seg_version": __version__,
        "model_versions": versions, "format": fmt, "order": order,
    }
    return {"info": info, "licenses": [], "images": coco_images, "categories": categories,
            "annotations": annotations}


def export_coco(store_url: str, out_url: str, *, fmt: str = "polygon", order: str = "confidence",
                limit: int | None = None) -> dict:
    """Write a label store's committed pseudo-masks as a COCO JSON file at ``out_url`` (any
    fsspec URL). Returns ``{"images": n, "annotations": m, "out": out_url}``.

    Raises :class:`cam2seg.store.StoreError` when the store has no committed masks,
    ValueError for bad options and NotADirectoryError for an ``out_url`` below a file (both
    checked before the store is read).
    """
    _check_options(fmt, order, limit)
    try:
        io.check_writable_parent(out_url)  # before the store is read: e.g. --out somefile.txt/out.json
    except IsADirectoryError as e:
        raise ValueError(str(e)) from None
    table = store.read_masks(store_url)
    if table.num_rows == 0:
        raise store.StoreError(f"{store_url}: no committed masks to export (is this a label store, and has a "
                               "`cam2seg label` run committed into it?)")
    class_ids = sorted(set(table.column("class_id").to_pylist()))
    names = store.committed_runs(store_url)[-1].names
    if names is not None:  # every class of the newest run, named, also those without a mask
        class_ids = sorted(set(class_ids) | set(range(1, len(names) + 1)))
        names = [names[c - 1] if c <= len(names) else f"class {c}" for c in class_ids]
    coco = build_coco(table, class_ids, fmt=fmt, order=order, limit=limit, class_names=names)
    coco["info"].update({"source": store_url, "date_created": store.now()})
    io.write_bytes(out_url, json.dumps(coco, separators=(",", ":")).encode())
    return {"images": len(coco["images"]), "annotations": len(coco["annotations"]), "out": out_url}
