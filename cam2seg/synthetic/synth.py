"""A synthetic Severstal-like archive: rolled-steel strips with four kinds of localised defect.

The generator is a fair test bed for weakly supervised segmentation: each class has its own
look *and* its own geometry, fitted to the real Severstal masks (the reference numbers in
:mod:`cam2seg.synthetic.maskstats`, checked by ``cam2seg synth --stats``), and the background carries things a classifier must
learn to ignore (texture, banding, gradients, and bright glare or dark off-strip areas near
the left/right edge that are not defects).

* class 1, pitting: clusters of small compact dark blobs with a speckled texture;
* class 2, streaks: thin bright vertical streaks, often touching the top or bottom edge;
* class 3, scratches/patches: striated near-vertical bands, a quarter spanning the full
  height, and some wide patches;
* class 4, blotches: wide irregular dark blotches with a low fill ratio.

Masks are exactly the pixels whose intensity the defect changed. Geometry is specified at
Severstal's 256 x 1600 and scaled to the requested size. Every image draws from its own
generator seeded by (seed, index), so archives are deterministic and can be made in parallel.
This module computes arrays only; :func:`write_archive` is the thin I/O layer.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .. import io, rle

__all__ = ["SynthImage", "generate", "sample_classes", "write_archive", "CLASS_COMBINATIONS"]

REF_H, REF_W = 256, 1600
NUM_CLASSES = 4

# Class combinations of the defective images of Kaggle's Severstal train set; per class they
# sum to its mask counts 897 / 247 / 5150 / 801.
CLASS_COMBINATIONS: dict[tuple[int, ...], int] = {
    (3,): 4759,
    (1,): 769,
    (4,): 516,
    (2,): 195,
    (3, 4): 284,
    (1, 3): 91,
    (1, 2): 35,
    (2, 3): 14,
    (1, 2, 3): 2,
    (2, 4): 1,
}
_COMBOS = list(CLASS_COMBINATIONS)
_COMBO_P = np.array(list(CLASS_COMBINATIONS.values()), dtype=np.float64)
_COMBO_P /= _COMBO_P.sum()


@dataclass
class SynthImage:
    """``image``: uint8[H, W] grayscale; ``masks``: bool[4, H, W] (axis c is ClassId c + 1)."""

    image: np.ndarray
    masks: np.ndarray

    @property
    def class_ids(self) -> list[int]:
        return [c + 1 for c in range(self.masks.shape[0]) if self.masks[c].any()]


CLASS_MIXES = ("severstal", "balanced")


def sample_classes(rng: np.random.Generator, clean_fraction: float = 0.45, mix: str = "severstal") -> tuple[int, ...]:
    """Defect classes (1-based) of one image: () for a clean one.

    ``mix``: "severstal" draws Severstal's class combinations; "balanced" gives each
    defective image one class uniformly, and a second one 15% of the time (for small
    archives where Severstal's rare classes would have a handful of images).
    """
    if rng.random() < clean_fraction:
        return ()
    if mix == "severstal":
        return _COMBOS[rng.choice(len(_COMBOS), p=_COMBO_P)]
    if mix == "balanced":
        k = 2 if rng.random() < 0.15 else 1
        return tuple(sorted(int(c) + 1 for c in rng.choice(NUM_CLASSES, size=k, replace=False)))
    raise ValueError(f"unknown class mix {mix!r}; use one of {', '.join(CLASS_MIXES)}")


# --------------------------------------------------------------------------- shapes
def _lognormal(rng, median: float, sigma: float, lo: float, hi: float) -> float:
    return float(np.clip(median * np.exp(sigma * rng.standard_normal()), lo, hi))


def _smooth_noise(rng, n: int, knots: int) -> np.ndarray:
    """1-D noise of length n, smooth over n/knots samples, roughly unit amplitude."""
    knots = max(2, knots)
    return np.interp(np.linspace(0, knots - 1, n), np.arange(knots), rng.standard_normal(knots))


def _blob(rng, h: float, w: float, roughness: float) -> np.ndarray:
    """An irregular filled ellipse about h x w: radius modulated by a few angular harmonics."""
    hh, ww = max(3, int(round(h))), max(3, int(round(w)))
    y = (np.arange(hh) + 0.5) / hh * 2 - 1
    x = (np.arange(ww) + 0.5) / ww * 2 - 1
    yy, xx = np.meshgrid(y, x, indexing="ij")
    rho = np.hypot(yy, xx)
    theta = np.arctan2(yy, xx)
    r = np.ones_like(rho)
    for k in range(2, 6):
        r += rng.uniform(0, roughness / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # Scale so that the largest radius just fits the box (the bbox stays about h x w).
    return rho <= r / max(r.max(), 1e-6)


def _band(rng, h: float, thickness: float, drift: float, taper: bool) -> np.ndarray:
    """A near-vertical band h tall: wandering centre line, varying thickness, tapered ends."""
    hh = max(3, int(round(h)))
    t = max(2.0, thickness)
    centre = drift * _smooth_noise(rng, hh, 4) + rng.uniform(-1, 1) * drift * np.linspace(-1, 1, hh)
    half = t / 2 * (1 + 0.25 * _smooth_noise(rng, hh, 6))
    if taper:
        ends = np.minimum(np.linspace(0, 1, hh), np.linspace(1, 0, hh))
        half = half * np.clip(ends * 6, 0.3, 1.0)
    half = np.maximum(half, 1.0)
    lo = np.floor(centre - half).min()
    ww = int(np.ceil((centre + half).max() - lo)) + 1
    x = np.arange(ww)[None, :] + lo
    return np.abs(x - centre[:, None]) <= half[:, None]


def _component(rng, class_id: int, sy: float, sx: float, H: int, alone: bool) -> np.ndarray:
    """One connected defect component of a class, in its own bounding box.

    ``alone``: the mask's only component (a lone pit is larger than the pits of a cluster).
    """
    if class_id == 1:  # compact pits: median ~40 x 24 at 256x1600
        k = 1.5 if alone else 1.0
        return _blob(rng, k * _lognormal(rng, 44, 0.35, 14, 140) * sy, k * _lognormal(rng, 27, 0.25, 12, 60) * sx, 0.25)
    if class_id == 2:  # thin streak: ~164 x 20
        h = _lognormal(rng, 175, 0.3, 60, REF_H) * sy
        return _band(rng, h, _lognormal(rng, 17, 0.25, 8, 32) * sx, 2.0 * sx, taper=True)
    if class_id == 3:
        if rng.random() < 0.15:  # a wide patch
            return _blob(rng, _lognormal(rng, 90, 0.4, 30, REF_H) * sy, _lognormal(rng, 220, 0.6, 60, 700) * sx, 0.3)
        full = rng.random() < 0.25
        h = H if full else _lognormal(rng, 130, 0.5, 30, REF_H) * sy
        return _band(rng, h, _lognormal(rng, 28, 0.4, 10, 90) * sx, 6.0 * sx, taper=not full)
    # class 4: wide irregular blotch: a core blob and a few lobes overlapping it (fill ~0.6)
    h, w = _lognormal(rng, 130, 0.45, 36, REF_H) * sy, _lognormal(rng, 240, 0.55, 45, 1000) * sx
    hh, ww = max(3, int(round(h))), max(3, int(round(w)))
    out = np.zeros((hh, ww), dtype=bool)
    core = _blob(rng, hh * 0.7, ww * 0.6, 0.45)
    cy, cx = (hh - core.shape[0]) // 2, (ww - core.shape[1]) // 2
    out[cy : cy + core.shape[0], cx : cx + core.shape[1]] = core
    for _ in range(int(rng.integers(2, 5))):
        b = _blob(rng, hh * rng.uniform(0.4, 0.65), ww * rng.uniform(0.3, 0.5), 0.45)
        # Lobes sit towards the box's edges but always overlap the core, so one component.
        y0 = int(np.clip(rng.normal((hh - b.shape[0]) / 2, hh * 0.2), 0, hh - b.shape[0]))
        x0 = int(np.clip(rng.normal((ww - b.shape[1]) / 2, ww * 0.25), 0, ww - b.shape[1]))
        lobe = np.zeros_like(out)
        lobe[y0 : y0 + b.shape[0], x0 : x0 + b.shape[1]] = b
        if (lobe & out).any():
            out |= lobe
    return out


def _n_components(rng, class_id: int) -> int:
    single = {1: 0.36, 2: 0.8, 3: 0.3, 4: 0.3}[class_id]
    if rng.random() < single:
        return 1
    median, hi = {1: (4, 14), 2: (2, 3), 3: (3, 9), 4: (2.5, 6)}[class_id]
    return int(np.clip(round(median * np.exp(0.55 * rng.standard_normal())), 2, hi))


# --------------------------------------------------------------------------- images
def _background(rng, H: int, W: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A rolled-steel strip (float32[H, W]) and the x range where defects may sit."""
    base = rng.uniform(85, 130)
    img = np.full((H, W), base, dtype=np.float32)
    # Horizontal rolling texture: noise smooth along x, sharp along y.
    streak = rng.standard_normal((H, max(2, W // 48)), dtype=np.float32)
    img += rng.uniform(3, 7) * cv2.resize(streak, (W, H), interpolation=cv2.INTER_LINEAR)
    img += rng.uniform(2, 8) * _smooth_noise(rng, W, int(rng.integers(8, 40)))[None, :]  # vertical banding
    gx, gy = np.linspace(-1, 1, W)[None, :], np.linspace(-1, 1, H)[:, None]
    img += rng.uniform(-12, 12) * gx + rng.uniform(-8, 8) * gy  # brightness gradients
    img += rng.uniform(2.5, 5) * rng.standard_normal((H, W), dtype=np.float32)
    lo, hi = 0, W
    side = rng.random()
    if side < 0.3:  # bright glare near one edge: not a defect
        width = int(rng.uniform(0.05, 0.2) * W)
        ramp = np.clip(1 - np.arange(W) / max(width, 1), 0, 1) ** 1.5
        ramp = ramp if rng.random() < 0.5 else ramp[::-1]
        img += rng.uniform(40, 80) * ramp[None, :] * (1 + 0.3 * _smooth_noise(rng, H, 5))[:, None]
    elif side < 0.45:  # the strip ends: a dark off-strip area at one side
        width = int(rng.uniform(0.04, 0.25) * W)
        edge = width + 3 * _smooth_noise(rng, H, 4)
        off = np.arange(W)[None, :] < edge[:, None]
        if rng.random() < 0.5:
            off = off[:, ::-1]
            hi = W - width - 4
        else:
            lo = width + 4
        img[off] = rng.uniform(8, 25) + rng.normal(0, 2, size=int(off.sum()))
    return img, (lo, hi)


def _paint(rng, img: np.ndarray, mask: np.ndarray, class_id: int, y0: int, x0: int) -> None:
    """Change the pixels of one component (mask is its bbox-local footprint at y0, x0)."""
    h, w = mask.shape
    view = img[y0 : y0 + h, x0 : x0 + w]
    if class_id == 1:  # dark pits with speckle
        tex = -rng.uniform(22, 38) - 18 * (rng.random((h, w)) < 0.35)
    elif class_id == 2:  # bright streak, brightest on its centre line
        core = np.exp(-(((np.arange(w) - w / 2) / max(w / 3, 1)) ** 2))[None, :]
        tex = rng.uniform(30, 50) * (0.6 + 0.4 * core) * np.ones((h, 1))
    elif class_id == 3:  # striated: diagonal fine stripes over a lighter band
        yy, xx = np.mgrid[0:h, 0:w]
        tex = rng.uniform(14, 24) + 12 * np.sin((yy + xx * rng.uniform(0.5, 1.5)) * rng.uniform(0.6, 1.0))
    else:  # dark smooth blotch
        tex = -rng.uniform(35, 55) + 4 * rng.standard_normal((h, w))
    view[mask] += np.broadcast_to(tex, (h, w))[mask].astype(np.float32)


def generate(rng: np.random.Generator, height: int = REF_H, width: int = REF_W, classes=None,
             clean_fraction: float = 0.45, mix: str = "severstal") -> SynthImage:
    """One synthetic image and its true masks. ``classes``: 1-based ids, or None to sample."""
    if height < 32 or width < 64:
        raise ValueError(f"synthetic images need at least 32x64 pixels, got {height}x{width}")
    if classes is None:
        classes = sample_classes(rng, clean_fraction, mix)
    sy, sx = height / REF_H, width / REF_W
    img, (lo, hi) = _background(rng, height, width)
    masks = np.zeros((NUM_CLASSES, height, width), dtype=bool)
    taken = np.zeros((height, width), dtype=bool)
    for class_id in sorted(classes):
        n = _n_components(rng, class_id)
        # Components of one mask cluster around a centre (tight for pits, loose for others).
        spread = {1: 0.09, 2: 0.15, 3: 0.25, 4: 0.2}[class_id] * width
        spread *= 4 if rng.random() < 0.3 else 1
        cx = rng.uniform(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo))
        for _ in range(n):
            comp = _component(rng, class_id, sy, sx, height, alone=n == 1)
            h, w = min(comp.shape[0], height), min(comp.shape[1], hi - lo)
            comp = comp[:h, :w]
            if class_id == 2 and rng.random() < 0.5:  # streaks often run off the top or bottom
                y0 = 0 if rng.random() < 0.5 else height - h
            else:
                y0 = int(np.clip(rng.normal(height / 2, height * 0.15) - h / 2, 0, height - h))
            x0 = int(np.clip(rng.normal(cx, spread) - w / 2, lo, hi - w))
            footprint = comp & ~taken[y0 : y0 + h, x0 : x0 + w]  # classes never share a pixel
            if not footprint.any():
                continue
            _paint(rng, img, footprint, class_id, y0, x0)
            masks[class_id - 1, y0 : y0 + h, x0 : x0 + w] |= footprint
            taken[y0 : y0 + h, x0 : x0 + w] |= footprint
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return SynthImage(image=image, masks=masks)


# --------------------------------------------------------------------------- archive I/O
def _image_id(index: int) -> str:
    return f"synth_{index:07d}.jpg"


def _encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _make_chunk(args) -> list:
    seed, first, stop, height, width, clean_fraction, mix = args
    out = []
    for index in range(first, stop):
        s = generate(np.random.default_rng([seed, index]), height, width, clean_fraction=clean_fraction, mix=mix)
        out.append((_image_id(index), _encode_jpeg(s.image), rle.encode_many(s.masks), tuple(s.class_ids)))
    return out


def _prepare_target(fs, root: str, out: str, force: bool) -> None:
    """Refuse a non-empty ``out`` (``force`` False) or empty it (True); see :func:`write_archive`."""
    root = root.rstrip("/") or "/"
    if not fs.exists(root):
        return
    if fs.isfile(root):
        raise NotADirectoryError(f"{out} is a file, not a folder")
    entries = fs.ls(root, detail=False)
    if not entries:
        return
    if not force:
        raise FileExistsError(f"{out} is not empty ({len(entries)} entries); pass --force to empty it first, "
                              "or choose a new folder")
    local = os.path.realpath(root) if isinstance(fs, LocalFileSystem) else None
    if local is not None and local in ("/", os.path.realpath(os.path.expanduser("~")), os.path.realpath(os.getcwd())):
        raise ValueError(f"refusing to empty {out} (the filesystem root, home or current folder)")
    for entry in entries:
        fs.rm(entry, recursive=True)


def write_archive(out: str, images: int = 1000, height: int = REF_H, width: int = REF_W, seed: int = 0,
                  clean_fraction: float = 0.45, workers: int = 1, progress=sys.stderr,
                  mix: str = "severstal", force: bool | None = None) -> dict:
    """Write a synthetic archive in the Severstal layout and return a summary.

    ``<out>/train_images/*.jpg``, ``<out>/train.csv`` (masks as Kaggle RLE),
    ``<out>/labels.csv`` (the same labels without masks: ImageId + one 0/1 column per class,
    clean images included) and ``<out>/synth.json`` (the parameters). The CSVs are written
    last, so an interrupted run never leaves an archive that claims images it lacks.

    ``force``: what to do when ``out`` exists and is not empty. False: refuse (FileExistsError;
    writing a smaller archive over a bigger one would leave old images that the new train.csv
    does not list, so they would read as clean). True: empty it first. None (the default, for
    callers that manage the folder themselves): write into it as it is. ``cam2seg synth``
    passes False unless ``--force``.
    """
    if images < 1:
        raise ValueError(f"--images must be at least 1, got {images}")
    if not 0 <= clean_fraction < 1:
        raise ValueError(f"clean fraction must be in [0, 1), got {clean_fraction}")
    generate(np.random.default_rng(0), height, width, classes=())  # validates the size early
    sample_classes(np.random.default_rng(0), 0.0, mix)  # and the class mix
    t0 = time.perf_counter()
    rows: list[tuple[str, int, str]] = []
    labels: list[tuple[str, list[int]]] = []
    chunk = 64
    tasks = [(seed, i, min(i + chunk, images), height, width, clean_fraction, mix) for i in range(0, images, chunk)]
    fs, root = io.filesystem(out)
    if force is not None:
        _prepare_target(fs, root, out, force)
    fs.makedirs(f"{root}/train_images", exist_ok=True)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    results = pool.map(_make_chunk, tasks) if pool else map(_make_chunk, tasks)
    done, last = 0, t0
    try:
        for batch in results:
            for image_id, data, rles, classes in batch:
                fs.pipe_file(f"{root}/train_images/{image_id}", data)
                rows.extend((image_id, c + 1, r) for c, r in enumerate(rles) if r)
                labels.append((image_id, [int(c + 1 in classes) for c in range(NUM_CLASSES)]))
            done += len(batch)
            now = time.perf_counter()
            if progress is not None and (now - last > 2 or done == images):
                print(f"synth: {done}/{images} images, {done / (now - t0):.1f} images/s", file=progress, flush=True)
                last = now
    finally:
        if pool:
            pool.shutdown()
    long_csv = _io.StringIO()
    w = csv.writer(long_csv, lineterminator="\n")
    w.writerow(["ImageId", "ClassId", "EncodedPixels"])
    w.writerows(rows)
    wide_csv = _io.StringIO()
    w = csv.writer(wide_csv, lineterminator="\n")
    w.writerow(["ImageId"] + [str(c + 1) for c in range(NUM_CLASSES)])
    w.writerows([iid, *lab] for iid, lab in labels)
    elapsed = time.perf_counter() - t0
    counts = np.array([lab for _, lab in labels]).sum(axis=0)
    summary = {
        "images": images,
        "height": height,
        "width": width,
        "seed": seed,
        "clean_fraction_requested": clean_fraction,
        "class_mix": mix,
        "clean_images": int(sum(1 for _, lab in labels if not any(lab))),
        "images_per_class": {str(c + 1): int(n) for c, n in enumerate(counts)},
        "masks": len(rows),
        "seconds": round(elapsed, 3),
        "images_per_second": round(images / elapsed, 1),
    }
    io.write_bytes(io.join(out, "synth.json"), json.dumps(summary, indent=2).encode())
    io.write_bytes(io.join(out, "labels.csv"), wide_csv.getvalue().encode())
    io.write_bytes(io.join(out, "train.csv"), long_csv.getvalue().encode())
    return summary
