"""Stage 2 at scale: label every image under a prefix with CAM pseudo-masks, on Ray Data.

One chain, as in Ray's batch-inference examples::

    image keys (driver: the key list only)
      -> read_batch        CPU tasks: download, decode, grey, resize; bad files become error rows
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

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from .. import preprocess, io, rle, store
from ..cam import compute_cams
from ..config import LabelConfig, parse_size
from ..postprocess import PostProcess, apply
from ..models.segmenter import predict_maps

__all__ = ["read_image", "label_images", "load_label_models", "Labeler", "read_batch", "write_batch", "label_archive", "LabelSummary"]


def read_image(url: str, size: tuple[int, int], expect: tuple[int, int] | None) -> tuple[np.ndarray, tuple, str]:
    """(``uint8[h, w]`` grey at the model's ``size``, original (H, W), error or "")."""
    try:
        img = io.decode_image(io.read_bytes(url))
    except io.ImageDecodeError as e:
        return np.zeros(size, np.uint8), (0, 0), str(e)
    except FileNotFoundError:
        return np.zeros(size, np.uint8), (0, 0), "file vanished after listing"
    except OSError as e:
        return np.zeros(size, np.uint8), (0, 0), f"read failed: {e}"
    shape = img.shape[:2]
    if expect is not None and tuple(shape) != tuple(expect):
        return np.zeros(size, np.uint8), shape, f"unexpected size {shape[0]}x{shape[1]} (expected {expect[0]}x{expect[1]})"
    if min(shape) < 2 or max(shape) > 32767:
        return np.zeros(size, np.uint8), shape, f"unsupported size {shape[0]}x{shape[1]}"
    return preprocess.prepare(img, size), shape, ""


def label_images(models, card, pp: PostProcess, images: np.ndarray, shapes, method: str = "gradcam++",
                 aug_smooth: bool = True, device="cpu") -> dict[str, list]:
    """Masks of a batch as store columns (one row per image and class): CAM pseudo-masks of a
    classifier ensemble (``method``, ``aug_smooth``), or a segmenter ensemble's masks (its mean
    probability maps; score = a map's maximum) when ``card.kind`` is "segmenter".

    ``images`` ``uint8[B, h, w]`` at ``card.input_size``; ``shapes`` the originals' (H, W).
    Returns columns image-major, class-minor: class_id, encoded_pixels, score, area, height,
    width (image ids are added by the caller).
    """
    x = preprocess.to_input(images, card.mean, card.std, device=device)
    if card.kind == "segmenter":
        cams, probs = predict_maps(models, x)
    else:
        cams, probs = compute_cams(models, x, method, aug_smooth)
    probs_np = probs.cpu().numpy()
    c = probs_np.shape[1]
    cols = {"class_id": [], "encoded_pixels": [], "score": [], "area": [], "height": [], "width": []}
    for i, (h, w) in enumerate(shapes):
        m = cams[i : i + 1]
        if tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        masks = apply(m.cpu().numpy(), probs_np[i : i + 1], pp)[0]
        cols["class_id"] += [int(k) for k in card.class_ids]
        cols["encoded_pixels"] += rle.encode_many(masks)
        cols["score"] += probs_np[i].tolist()
        cols["area"] += masks.sum(axis=(-2, -1)).tolist()
        cols["height"] += [h] * c
        cols["width"] += [w] * c
    return cols


def load_label_models(model_url: str, device="cpu") -> tuple:
    """(card, fold models) of a classifier or segmenter artifact, whichever ``model_url`` holds."""
    from ..artifact import load_card
    from ..models.classifier import load_fold_models
    from ..models.segmenter import load_segmenters

    return (load_segmenters if load_card(model_url).kind == "segmenter" else load_fold_models)(model_url, device)


def _expected_size(cfg: LabelConfig, card) -> tuple[int, int] | None:
    if cfg.image_size == "any":
        return None
    if cfg.image_size == "auto":
        size = card.data.get("image_size")
        return tuple(size) if size else None
    return parse_size(cfg.image_size)


def read_batch(batch: dict, prefix: str, size: tuple[int, int], expect, threads: int) -> dict:
    """Ray Data task: ``{"image_id"}`` -> images, original sizes and errors."""
    ids = [str(i) for i in batch["image_id"]]
    urls = [io.join(prefix, i) for i in ids]
    with ThreadPoolExecutor(max(1, min(threads, len(ids)))) as pool:
        res = list(pool.map(lambda u: read_image(u, size, expect), urls))
    return {
        "image_id": np.array(ids, dtype=object), "uri": np.array(urls, dtype=object),
        "image": np.stack([r[0] for r in res]) if res else np.zeros((0, *size), np.uint8),
        "height": np.array([r[1][0] for r in res], np.int32), "width": np.array([r[1][1] for r in res], np.int32),
        "error": np.array([r[2] for r in res], dtype=object),
    }


class Labeler:
    """Ray Data callable class: the artifact is loaded once per actor, then each batch of read
    images becomes one row per image with per-class list columns, so later batching can never
    split an image's classes across parts (bad images pass through with their error)."""

    def __init__(self, model_url: str, method: str, aug_smooth: bool, batch_size: int, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.card, self.models = load_label_models(model_url, self.device)
        self.pp = PostProcess(**self.card.postprocess)
        self.method, self.aug_smooth, self.batch_size = method, aug_smooth, batch_size

    def __call__(self, batch: dict) -> pa.Table:
        n, c = len(batch["image_id"]), self.card.num_classes
        enc, score, area = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        for s in range(0, len(ok), self.batch_size):
            idx = ok[s : s + self.batch_size]
            shapes = [(int(batch["height"][i]), int(batch["width"][i])) for i in idx]
            cols = label_images(self.models, self.card, self.pp, batch["image"][idx], shapes, self.method,
                                self.aug_smooth, self.device)
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
        pos = ", ".join(f"class {k}: {v}" for k, v in self["positives"].items())
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
                  log=None) -> LabelSummary:
    """Label every image under ``images`` into the store at ``store_url`` (see module doc).

    ``incremental``: skip images a committed run labeled with this model version; ``new_only``:
    skip images a committed run labeled with any model (the nightly run's rule). ``relabel``
    overrides both. Holds the store's lease for the whole run.
    """
    import ray

    from ..artifact import load_card
    from ..raycluster import cluster_gpus, ensure_ray, gpus_or_auto

    cfg = cfg or LabelConfig()
    model_url, images, store_url = io.absolute(model_url), io.absolute(images), io.absolute(store_url)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    card = load_card(model_url)  # a missing or broken model fails here, before anything else
    keys = io.list_images(images)
    if not keys:
        raise FileNotFoundError(f"no images under {images} (looked for {', '.join(io.IMAGE_EXTENSIONS)})")
    run_id = store.new_run_id()
    t0 = time.perf_counter()
    with store.Lease(store_url, run_id, ttl=cfg.lease_ttl):
        removed = store.remove_uncommitted(store_url)
        if removed:
            log(f"removed {removed} uncommitted part(s) left by an earlier crashed run")
        skip = (incremental or new_only) and not relabel
        done = store.labeled_ids(store_url, None if new_only else card.version) if skip else set()
        todo = [k for k in keys if k not in done]
        by = "any model" if new_only else f"model {card.version}"
        log(f"{len(keys)} images under {images}; {len(done & set(keys))} already labeled by {by}; "
            f"labeling {len(todo)} with the {card.kind} into {store_url} (run {run_id})")
        marker = {"model": model_url, "model_kind": card.kind, "model_version": card.version, "images": images,
                  "listed": len(keys), "to_do": len(todo), "start": store.now(), "complete": False,
                  "incremental": "new-only" if new_only else incremental,
                  "config": cfg.model_dump(mode="json"), "parts": {"masks": [], "errors": []},
                  "labeled": 0, "errors": 0}
        positives = np.zeros(card.num_classes, np.int64)
        if todo:
            ensure_ray()
            gpus = gpus_or_auto(cfg.gpus_per_actor, log)
            actors = cfg.actors or max(1, int(cluster_gpus() // gpus) if gpus else 1)
            expect = _expected_size(cfg, card)
            keys_table = pa.table({"image_id": pa.array(todo, pa.string())})
            blocks = [keys_table.slice(s, cfg.read_batch) for s in range(0, len(todo), cfg.read_batch)]
            ds = (
                ray.data.from_arrow(blocks)
                # fewer CPUs than an actor: Ray Data then keeps reads as their own tasks (not fused
                # into the actors), so downloads overlap the CAMs
                .map_batches(read_batch, batch_size=cfg.read_batch, num_cpus=cfg.read_cpus,
                             fn_kwargs={"prefix": images, "size": tuple(card.input_size), "expect": expect,
                                        "threads": cfg.read_threads})
                .map_batches(Labeler, batch_size=cfg.batch_size, num_gpus=gpus, num_cpus=cfg.cpus_per_actor,
                             compute=ray.data.ActorPoolStrategy(size=actors),
                             fn_constructor_kwargs={"model_url": model_url, "method": cfg.method,
                                                    "aug_smooth": cfg.aug_smooth, "batch_size": cfg.batch_size,
                                                    "threads": max(1, int(cfg.cpus_per_actor))})
                .map_batches(write_batch, batch_size=cfg.images_per_file, batch_format="pyarrow",
                             num_cpus=cfg.read_cpus, fn_kwargs={"store_url": store_url, "run_id": run_id,
                                                      "model_version": card.version,
                                                      "class_ids": list(card.class_ids)})
            )
            since_commit = 0
            for entry in ds.iter_rows():
                for kind in ("masks", "errors"):
                    if entry[kind]:
                        marker["parts"][kind].append({"file": entry[kind], "rows": int(entry[f"{kind}_rows"])})
                marker["labeled"] += int(entry["images"])
                marker["errors"] += int(entry["error_images"])
                positives += np.asarray(entry["positives"], np.int64)
                since_commit += int(entry["images"]) + int(entry["error_images"])
                if since_commit >= cfg.commit_every:
                    store.commit(store_url, run_id, {**marker, "end": store.now()})
                    since_commit = 0
                    # job logs have no progress bars: this line is the progress of a long run
                    done_now, spent = marker["labeled"] + marker["errors"], time.perf_counter() - t0
                    rate = done_now / spent if spent > 0 else 0.0
                    eta = (len(todo) - done_now) / rate if rate > 0 else float("nan")
                    log(f"committed {done_now} / {len(todo)} images ({marker['errors']} errors), "
                        f"{rate:.1f} images/s, about {eta / 60:.0f} min to go")
        _reconcile(store_url, run_id, marker, todo)
        marker.update(complete=True, end=store.now(), positives=positives.tolist())
        store.commit(store_url, run_id, marker)
    seconds = time.perf_counter() - t0
    summary = LabelSummary(run_id=run_id, store=store_url, images=images, listed=len(keys), skipped=len(keys) - len(todo),
                           to_do=len(todo), labeled=marker["labeled"], errors=marker["errors"],
                           model_version=card.version, new_only=new_only, seconds=seconds,
                           images_per_s=len(todo) / seconds if seconds > 0 else 0.0,
                           positives={cid: int(p) for cid, p in zip(card.class_ids, positives)})
    log(str(summary))
    return summary


def _reconcile(store_url: str, run_id: str, marker: dict, todo: list[str]) -> None:
    """Every image to do is in exactly one of masks (once per class) or errors, before the
    final commit; anything else is a bug worth stopping for, not a number to print."""
    if marker["labeled"] + marker["errors"] != len(todo):
        raise RuntimeError(f"run {run_id}: {len(todo)} images to do, but {marker['labeled']} labeled + "
                           f"{marker['errors']} errors; not committing it as complete")
    run = {**marker, "run_id": run_id}
    ids = store.read_parts(store_url, [run], "masks", store.MASK_SCHEMA, ["image_id", "class_id"])
    errs = store.read_parts(store_url, [run], "errors", store.ERROR_SCHEMA, ["image_id"])
    pairs = set(zip(ids.column("image_id").to_pylist(), ids.column("class_id").to_pylist()))
    seen = {i for i, _ in pairs} | set(errs.column("image_id").to_pylist())
    if len(pairs) != ids.num_rows or seen != set(todo) or len({i for i, _ in pairs}) + errs.num_rows != len(todo):
        raise RuntimeError(f"run {run_id}: written rows do not reconcile with the {len(todo)} images to do "
                           f"({ids.num_rows} mask rows, {len(pairs)} distinct, {errs.num_rows} errors)")
