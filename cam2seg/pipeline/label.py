"""Stage 2 at scale: label every image under a prefix with CAM pseudo-masks, on Ray Data.

One chain, as in Ray's batch-inference examples::

    image keys (driver: the key list only)
      -> read_batch        CPU tasks: download, decode, to the model's channels (grey or RGB),
                           resize; bad files become error rows
      -> Labeler           actor pool (GPU if present): fold ensemble, fast CAM engine (or, for a
                           segmenter artifact, its probability maps), the card's
                           post-processing, Kaggle RLE (on the actor's CPU: full-size masks cost more
                           to ship between stages than their RLE strings)
      -> write_batch       CPU tasks: one Parquet part per ``images_per_file`` images
      -> driver            commits parts to the run's marker every ``commit_every`` images

The plain functions (:func:`read_image`, :func:`label_images`) carry the algorithm and are
what tests compare against; the Ray layer only moves data. See :mod:`cam2seg.store` for the
commit protocol that makes re-runs after a crash exact.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import preprocess, io, rle, store
from ..classes import check_same
from ..config import LabelConfig, parse_size
from ..refine import Refine
from ..models.compose import Composition, load_composed
from ..models.predict import Predictor, load_predictor

__all__ = ["read_image", "label_images", "label_gates", "Labeler", "read_batch", "write_batch", "label_archive",
           "LabelSummary"]

_log = logging.getLogger(__name__)


def read_image(url: str, size: tuple[int, int], expect: tuple[int, int] | None, *, prefix: str | None = None,
               max_pixels: int | None = io.DEFAULT_MAX_PIXELS, channels: int = 1) -> tuple[np.ndarray, tuple, str]:
    """(``uint8[h, w]`` grey or ``uint8[h, w, 3]`` RGB (``channels``) at the model's ``size``,
    original (H, W), error or "").

    Never raises for a bad file: every failure (unreadable, undecodable, over ``max_pixels``,
    a local symlink resolving outside ``prefix``, a resize that fails) is the error string.
    """
    blank = np.zeros(tuple(size) + ((3,) if channels == 3 else ()), np.uint8)
    try:
        if prefix is not None and io.outside_prefix(url, prefix):
            return blank, (0, 0), "resolves outside the image prefix (symlink); refused"
        img = io.decode_image(io.read_bytes(url), max_pixels=max_pixels)
    except io.ImageDecodeError as e:
        return blank, (0, 0), str(e)
    except FileNotFoundError:
        return blank, (0, 0), "file vanished after listing"
    except OSError as e:
        return blank, (0, 0), f"read failed: {e}"
    except Exception as e:  # noqa: BLE001 -- a bad file must never stop the job
        return blank, (0, 0), f"read failed: {type(e).__name__}: {e}"
    shape = img.shape[:2]
    if expect is not None and tuple(shape) != tuple(expect):
        return blank, shape, f"unexpected size {shape[0]}x{shape[1]} (expected {expect[0]}x{expect[1]})"
    if min(shape) < 2 or max(shape) > 32767:
        return blank, shape, f"unsupported size {shape[0]}x{shape[1]}"
    try:
        return preprocess.prepare(img, size, channels), shape, ""
    except Exception as e:  # noqa: BLE001 -- e.g. cv2.error on an odd array
        return blank, shape, f"preprocessing failed: {type(e).__name__}: {e}"


def label_images(predictor: Predictor, images: np.ndarray, shapes, gates: np.ndarray | None = None) -> dict[str, list]:
    """Masks of a batch as store columns (one row per image and class), from any artifact's
    :class:`~cam2seg.models.predict.Predictor`: CAM pseudo-masks of a classifier ensemble, or a
    segmenter ensemble's masks (score = a map's maximum), after the card's post-processing.

    ``images`` ``uint8[B, h, w(, 3)]`` at the card's input size and channels; ``shapes`` the originals' (H, W);
    ``gates`` ``int8[B, C]`` from image-level labels (1 present, 0 absent: always an empty mask,
    -1 unknown: the card's confidence decides). Returns columns image-major, class-minor:
    class_id, encoded_pixels, score, area, height, width (image ids are added by the caller).
    """
    masks, scores = predictor.masks(images, shapes, gate=gates)
    c = len(predictor.class_ids)
    cols = {"class_id": [], "encoded_pixels": [], "score": [], "area": [], "height": [], "width": []}
    for (h, w), m, s in zip(shapes, masks, scores):
        cols["class_id"] += predictor.class_ids
        cols["encoded_pixels"] += rle.encode_many(m)
        cols["score"] += s.tolist()
        cols["area"] += m.sum(axis=(-2, -1)).tolist()
        cols["height"] += [h] * c
        cols["width"] += [w] * c
    return cols


def label_gates(labels_url: str, class_names: list[str]) -> dict[str, np.ndarray]:
    """Image id -> ``int8[C]`` gate (1 present, 0 absent) from image-level labels: an archive
    folder (its ``train.csv`` or ``labels.csv``; with a long ``train.csv`` the images under
    ``train_images/`` that it does not list are clean) or a labels CSV alone (then only the
    images it lists are known). Images it does not know are left to the classifier's gate. The
    labels' classes must be ``class_names`` (the model's), in order."""
    from ..archive import IMAGES_DIR, Archive, ArchiveError

    url = io.absolute(str(labels_url).rstrip("/"))
    root = url.rpartition("/")[0] if url.lower().endswith(".csv") else url
    has_images = io.exists(io.join(root, IMAGES_DIR))
    # bad image files are the labeling job's to report (error rows), not a reason to refuse the labels
    archive = Archive.open(url, check_images=has_images, strict_images=False)
    check_same(archive.class_names, f"labels {archive.source}", class_names, "the model")
    return {iid: archive.labels[i].astype(np.int8) for i, iid in enumerate(archive.image_ids)}


def _dump(model) -> dict | None:
    return None if model is None else model.model_dump(mode="json")


def _expected_size(cfg: LabelConfig, card) -> tuple[int, int] | None:
    if cfg.image_size == "any":
        return None
    if cfg.image_size == "auto":
        size = card.data.get("image_size")
        return tuple(size) if size else None
    return parse_size(cfg.image_size)


def read_batch(batch: dict, prefix: str, size: tuple[int, int], expect, threads: int,
               max_pixels: int | None = io.DEFAULT_MAX_PIXELS, channels: int = 1) -> dict:
    """Ray Data task: ``{"image_id"}`` -> images, original sizes and errors (bad files, images over
    ``max_pixels`` and symlinks resolving outside ``prefix`` become error rows)."""
    ids = [str(i) for i in batch["image_id"]]
    urls = [io.join(prefix, i) for i in ids]
    with ThreadPoolExecutor(max(1, min(threads, len(ids)))) as pool:
        res = list(pool.map(lambda u: read_image(u, size, expect, prefix=prefix, max_pixels=max_pixels,
                                                 channels=channels), urls))
    out = {
        "image_id": np.array(ids, dtype=object), "uri": np.array(urls, dtype=object),
        "image": np.stack([r[0] for r in res]) if res else
        np.zeros((0, *size) + ((3,) if channels == 3 else ()), np.uint8),
        "height": np.array([r[1][0] for r in res], np.int32), "width": np.array([r[1][1] for r in res], np.int32),
        "error": np.array([r[2] for r in res], dtype=object),
    }
    if "gate" in batch:  # image-level labels, passed on to the Labeler
        out["gate"] = np.stack([np.asarray(g, np.int8) for g in batch["gate"]]) if ids else np.zeros((0, 0), np.int8)
    return out


class Labeler:
    """Ray Data callable class: the artifact is loaded once per actor, then each batch of read
    images becomes one row per image with per-class list columns, so later batching can never
    split an image's classes across parts (bad images pass through with their error)."""

    def __init__(self, model_url: str, method: str, aug_smooth: bool, batch_size: int, threads: int = 1,
                 refine: dict | None = None, segmenter_url: str | None = None, composition: dict | None = None):
        torch.set_num_threads(max(1, threads))
        if segmenter_url:
            self.predictor, _ = load_composed(model_url, segmenter_url, composition=Composition(**composition))
        else:
            self.predictor = load_predictor(model_url, method=method, aug_smooth=aug_smooth,
                                            refine=Refine(**refine) if refine is not None else None)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> pa.Table:
        n, c = len(batch["image_id"]), self.predictor.card.num_classes
        enc, score, area = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        for s in range(0, len(ok), self.batch_size):
            idx = ok[s : s + self.batch_size]
            shapes = [(int(batch["height"][i]), int(batch["width"][i])) for i in idx]
            gates = batch["gate"][idx] if "gate" in batch else None
            cols = label_images(self.predictor, batch["image"][idx], shapes, gates)
            for j, i in enumerate(idx):
                enc[i] = cols["encoded_pixels"][j * c : (j + 1) * c]
                score[i] = cols["score"][j * c : (j + 1) * c]
                area[i] = cols["area"][j * c : (j + 1) * c]
        return pa.table({
            "image_id": pa.array([str(i) for i in batch["image_id"]], pa.string()),
            "uri": pa.array([str(u) for u in batch["uri"]], pa.string()),
            "error": pa.array([str(e) for e in batch["error"]], pa.string()),
            "height": pa.array(batch["height"], pa.int32()), "width": pa.array(batch["width"], pa.int32()),
            "encoded_pixels": pa.array(enc, pa.list_(pa.string())),
            "score": pa.array(score, pa.list_(pa.float32())), "area": pa.array(area, pa.list_(pa.int32())),
        })


def write_batch(batch: pa.Table, store_url: str, run_id: str, model_version: str, class_ids: list[int]) -> pa.Table:
    """Ray Data task: write the batch's images as a masks part (one row per image and class)
    and its bad images as an errors part; return the batch's manifest row."""
    bad_mask = pc.not_equal(batch.column("error"), "")
    good, bad = batch.filter(pc.invert(bad_mask)), batch.filter(bad_mask)
    c = len(class_ids)
    entry = {"masks": None, "masks_rows": 0, "errors": None, "errors_rows": 0, "images": good.num_rows,
             "error_images": bad.num_rows, "positives": [0] * c}
    if good.num_rows:
        n = good.num_rows * c
        rep = lambda col, typ: pa.array(np.repeat(good.column(col).to_numpy(zero_copy_only=False), c), typ)  # noqa: E731
        t = pa.table({
            "image_id": rep("image_id", pa.string()),
            "class_id": pa.array(np.tile(np.asarray(class_ids, np.int8), good.num_rows), pa.int8()),
            "encoded_pixels": pc.list_flatten(good.column("encoded_pixels")),
            "score": pc.list_flatten(good.column("score")),
            "area": pc.list_flatten(good.column("area")),
            "height": rep("height", pa.int16()), "width": rep("width", pa.int16()),
            "model_version": pa.array([model_version] * n, pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
        }, schema=store.MASK_SCHEMA)
        if t.column("encoded_pixels").length() != n:
            raise RuntimeError(f"labeler returned {t.column('encoded_pixels').length()} masks for {good.num_rows} "
                               f"images of {c} classes")
        entry["masks"], entry["masks_rows"] = store.write_part(store_url, "masks", run_id, t)["file"], n
        entry["positives"] = (t.column("area").to_numpy().reshape(-1, c) > 0).sum(axis=0).tolist()
    if bad.num_rows:
        t = pa.table({"image_id": bad.column("image_id"), "uri": bad.column("uri"), "error": bad.column("error"),
                      "run_id": pa.array([run_id] * bad.num_rows, pa.string())}, schema=store.ERROR_SCHEMA)
        entry["errors"], entry["errors_rows"] = store.write_part(store_url, "errors", run_id, t)["file"], bad.num_rows
    return pa.Table.from_pylist([entry])


class LabelSummary(dict):
    """What a run did; ``str()`` is the summary the command prints."""

    def __str__(self) -> str:
        pos = ", ".join(f"{k}: {v}" for k, v in self["positives"].items())
        return (f"run {self['run_id']} committed to {self['store']}\n"
                f"  images listed under {self['images']}: {self['listed']}; already labeled by "
                f"{'any model' if self.get('new_only') else 'model ' + self['model_version']}: {self['skipped']}; "
                f"labeled now: {self['labeled']}; "
                f"errors: {self['errors']}\n"
                f"  {self['labeled'] + self['errors']} / {self['to_do']} processed "
                f"in {self['seconds']:.1f}s ({self['images_per_s']:.2f} images/s)\n"
                f"  images with a mask, per class: {pos}\n"
                f"  read it: cam2seg.store.read_masks({self['store']!r})")


def label_archive(model_url: str, images: str, store_url: str, cfg: LabelConfig | None = None, *,
                  incremental: bool = False, relabel: bool = False, new_only: bool = False,
                  labels: str | None = None, segmenter: str | None = None) -> LabelSummary:
    """Label every image under ``images`` into the store at ``store_url`` (see module doc).

    ``incremental``: skip images a committed run labeled with this model version; ``new_only``:
    skip images a committed run labeled with any model (the nightly run's rule). ``relabel``
    overrides both. ``labels``: image-level labels (:func:`label_gates`); a class they say is
    absent gets an empty mask, one they name gets its mask whatever the classifier's score, and
    images they do not know keep the card's confidence gate. ``segmenter``: a segmenter artifact
    composed with the classifier at ``model_url`` (:mod:`cam2seg.models.compose`): the classifier's
    probability gates each class, the segmenter's map gives its shape, at the setting the
    segmenter's card holds for this classifier (the marker records it). Holds the store's lease
    for the whole run.
    """
    cfg = cfg or LabelConfig()
    model_url, images, store_url = io.absolute(model_url), io.absolute(images), io.absolute(store_url)
    # The whole artifact is checked here, on the driver (card, every weight file's hash, the
    # network it describes): a broken model fails before anything is listed, not inside actors.
    card = load_predictor(model_url, "cpu").card
    version, kind, read = card.version, card.kind, _Read(tuple(card.input_size), card.channels)
    composition = None
    if segmenter:
        segmenter = io.absolute(segmenter)
        composed, why = load_composed(model_url, segmenter, "cpu")
        composition, version, kind = composed.composition, composed.version, composed.kind
        read = _read_for(card, composed.shape.card)
        _log.info(f"composing {model_url} (presence: the classifier's probability) with {segmenter} (shape: the "
                  f"segmenter's map): {why}; confidence {composition.confidence}, threshold {composition.threshold}, "
                  f"min_seg_len {composition.min_seg_len}")
    keys = io.list_images(images)
    if not keys:
        raise FileNotFoundError(f"no images under {images} (looked for {', '.join(io.IMAGE_EXTENSIONS)})")
    gates = label_gates(labels, card.names) if labels else None
    store.check_classes(store_url, card.names, f"model {model_url}")
    run_id = store.new_run_id()
    t0 = time.perf_counter()
    marker = store.RunMarker(run_id=run_id, model=model_url, model_kind=kind, model_version=version,
                             images=images, listed=len(keys), start=store.now(),
                             incremental="new-only" if new_only else incremental,
                             # the refinement in force, the card's when the config names none
                             config={**cfg.model_dump(mode="json"), "refine": _dump(cfg.refine or card.postprocess.refine)},
                             labels=io.absolute(labels) if labels else None, class_names=card.names,
                             label_gated=sum(k in gates for k in keys) if gates else 0, segmenter=segmenter,
                             composition=composition.model_dump(mode="json") if composition else None)
    if gates is not None:
        _log.info(f"image-level labels {labels} gate {marker.label_gated} of the {len(keys)} images; the rest "
                  "keep the model's confidence gate")
    with store.RunWriter(store_url, marker, cfg.commit_every, cfg.lease_ttl) as writer:
        if writer.removed:
            _log.info(f"removed {writer.removed} uncommitted part(s) left by an earlier crashed run")
        skip = (incremental or new_only) and not relabel
        listed = pa.array(keys, pa.string())
        done = pc.is_in(listed, value_set=store.labeled_ids(store_url, None if new_only else version)) \
            if skip else pa.array(np.zeros(len(keys), bool))
        todo = listed.filter(pc.invert(done)).to_pylist()
        marker.to_do = len(todo)
        by = "any model" if new_only else f"model {version}"
        _log.info(f"{len(keys)} images under {images}; {len(keys) - len(todo)} already labeled by {by}; "
                  f"labeling {len(todo)} with the {kind} into {store_url} (run {run_id})")
        positives = np.zeros(card.num_classes, np.int64)
        if todo:
            for entry in _labeled_parts(todo, model_url, images, store_url, run_id, card, cfg, gates,
                                        version=version, read=read, segmenter=segmenter, composition=composition):
                positives += np.asarray(entry["positives"], np.int64)
                part = {k: store.Part(file=entry[k], rows=int(entry[f"{k}_rows"])) if entry[k] else None
                        for k in ("masks", "errors")}
                if writer.add(part["masks"], part["errors"], int(entry["images"]), int(entry["error_images"])):
                    # job logs have no progress bars: this line is the progress of a long run
                    spent = time.perf_counter() - t0
                    rate = writer.done / spent if spent > 0 else 0.0
                    eta = (len(todo) - writer.done) / rate if rate > 0 else float("nan")
                    _log.info(f"committed {writer.done} / {len(todo)} images ({marker.errors} errors), "
                              f"{rate:.1f} images/s, about {eta / 60:.0f} min to go")
        marker = writer.finish(todo, positives.tolist())
    seconds = time.perf_counter() - t0
    return LabelSummary(run_id=run_id, store=store_url, images=images, listed=len(keys), skipped=len(keys) - len(todo),
                        to_do=len(todo), labeled=marker.labeled, errors=marker.errors,
                        model_version=version, new_only=new_only, seconds=seconds,
                        images_per_s=len(todo) / seconds if seconds > 0 else 0.0,
                        positives={name: int(p) for name, p in zip(card.names, positives)})


class _Read(NamedTuple):
    """What the read tasks give the Labeler: images at ``size`` (h, w) in ``channels``."""

    size: tuple[int, int]
    channels: int


def _read_for(classifier, segmenter) -> _Read:
    """A composition reads each image once, at the larger model input and with colour if either
    model reads colour; each model then resizes or converts its own input."""
    sizes = [tuple(classifier.input_size), tuple(segmenter.input_size)]
    return _Read(max(sizes, key=lambda s: s[0] * s[1]), max(classifier.channels, segmenter.channels))


def _labeled_parts(todo: list[str], model_url: str, images: str, store_url: str, run_id: str, card,
                   cfg: LabelConfig, gates: dict[str, np.ndarray] | None = None, *, version: str,
                   read: _Read, segmenter: str | None = None, composition=None):
    """The Ray Data chain over ``todo``: one manifest row per written part batch (see module doc)."""
    import ray

    from ..raycluster import cluster_gpus, ensure_ray, gpus_or_auto

    ensure_ray()
    gpus = gpus_or_auto(cfg.gpus_per_actor, _log.warning)
    actors = cfg.actors or max(1, int(cluster_gpus() // gpus) if gpus else 1)
    columns = {"image_id": pa.array(todo, pa.string())}
    if gates is not None:
        unknown = np.full(card.num_classes, -1, np.int8)
        columns["gate"] = pa.array([gates.get(k, unknown).tolist() for k in todo], pa.list_(pa.int8()))
    keys_table = pa.table(columns)
    blocks = [keys_table.slice(s, cfg.read_batch) for s in range(0, len(todo), cfg.read_batch)]
    ds = (
        ray.data.from_arrow(blocks)
        # fewer CPUs than an actor: Ray Data then keeps reads as their own tasks (not fused
        # into the actors), so downloads overlap the CAMs
        .map_batches(read_batch, batch_size=cfg.read_batch, num_cpus=cfg.read_cpus,
                     fn_kwargs={"prefix": images, "size": read.size, "expect": _expected_size(cfg, card),
                                "threads": cfg.read_threads, "max_pixels": cfg.max_pixels,
                                "channels": read.channels})
        .map_batches(Labeler, batch_size=cfg.batch_size, num_gpus=gpus, num_cpus=cfg.cpus_per_actor,
                     compute=ray.data.ActorPoolStrategy(size=actors),
                     fn_constructor_kwargs={"model_url": model_url, "method": cfg.method,
                                            "aug_smooth": cfg.aug_smooth, "batch_size": cfg.batch_size,
                                            "threads": max(1, int(cfg.cpus_per_actor)),
                                            "refine": cfg.refine.model_dump() if cfg.refine else None,
                                            "segmenter_url": segmenter,
                                            "composition": composition.model_dump() if composition else None})
        .map_batches(write_batch, batch_size=cfg.images_per_file, batch_format="pyarrow",
                     num_cpus=cfg.read_cpus, fn_kwargs={"store_url": store_url, "run_id": run_id,
                                                        "model_version": version,
                                                        "class_ids": list(card.class_ids)})
    )
    yield from ds.iter_rows()
