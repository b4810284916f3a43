"""Manifest rows -> what a fold's model reads: images and targets, per stage.

Plain functions over a ``pyarrow.Table`` of manifest rows (:mod:`cam2seg.train.manifest`) and
the fold's loop config (a dict: the stage's config section as JSON, ``num_classes``, ``channels``
(the image channels the model reads, 1 or 3), and for the segmenter ``size`` and ``refine``). They import neither torch nor the typed config: Ray Data's
decode tasks (:func:`cam2seg.train.ingest.decode_rows`) run them in fresh worker processes,
where importing torch would cost seconds per process.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from .. import preprocess
from .targets import build_targets

__all__ = ["classifier_rows", "segmenter_rows", "DECODERS"]


def classifier_rows(rows: pa.Table, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(images ``uint8[N, h, w(, 3)]`` at the classifier's ``size``, labels ``float32[N, C]``)."""
    c = config["classifier"]
    x = preprocess.load_images(rows.column("uri").to_pylist(), tuple(c["size"]), c["load_threads"],
                               int(config.get("channels", 1)))
    return x, np.asarray(rows.column("labels").to_pylist(), np.float32).reshape(len(x), int(config["num_classes"]))


def segmenter_rows(rows: pa.Table, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(images ``uint8[N, h, w(, 3)]`` at ``size``, targets ``int8[N, C, h, w]`` in {0, 1, IGNORE}):
    the rows' RLE masks, refined with their image-level labels when ``refine`` (pseudo-masks),
    except rows whose ``true`` column is set (mixed supervision: true masks, used as they are)."""
    c, size = config["segmenter"], tuple(config["size"])
    x = preprocess.load_images(rows.column("uri").to_pylist(), size, c["load_threads"], int(config.get("channels", 1)))
    shapes = list(zip(rows.column("height").to_pylist(), rows.column("width").to_pylist()))
    labels = rows.column("labels").to_pylist() if config["refine"] else None
    if labels is not None and "true" in rows.column_names:
        labels = [None if t else lab for lab, t in zip(labels, rows.column("true").to_pylist())]
    return x, build_targets(rows.column("rles").to_pylist(), shapes, size, labels, SimpleNamespace(**c))


DECODERS = {"classifier": classifier_rows, "segmenter": segmenter_rows}
