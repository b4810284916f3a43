"""A synthetic Severstal-like archive: rolled-steel strips with localised defects of C classes.

The generator is a fair test bed for weakly supervised segmentation: each class has its own
look *and* its own geometry, fitted to the real Severstal masks (the reference numbers in
:mod:`cam2seg.synthetic.maskstats`, checked by ``cam2seg synth --stats``), and the background carries things a classifier must
learn to ignore (texture, banding, gradients, and bright glare or dark off-strip areas near
the left/right edge that are not defects).

The default archive has Severstal's four classes, one per defect family:

* class 1, pitting: clusters of small compact dark blobs with a speckled texture;
* class 2, streaks: thin bright vertical streaks, often touching the top or bottom edge;
* class 3, scratches/patches: striated near-vertical bands, a quarter spanning the full
  height, and some wide patches;
* class 4, blotches: wide irregular dark blotches with a low fill ratio.

Any count C in 1..16 works: class k has the geometry of family ((k - 1) % 4) + 1, and the
classes beyond the first four of a family change its look so that a classifier can tell
them apart (:func:`class_look`): classes 5-8 flip the brightness change (bright pits, dark
streaks...), classes 9-12 modulate it with a fine checkerboard, classes 13-16 do both.

Colour (``color``): RGB images built in a luma/chroma space (JPEG's YCbCr). The luma is the
grey image above, so a grey conversion shows every defect as it does today; the background
gets a slight per-image tint, and each class also moves the chroma towards its own hue
(C evenly spaced hues), which adds class information. ``color_only``: every class is a
blotch with the same brightness change, and the classes differ *only* in hue at equal luma,
so a grey model cannot tell them apart while a colour one can.

Masks are exactly the pixels whose intensity (or colour) the defect changed. Geometry is
specified at Severstal's 256 x 1600 and scaled to the requested size. Every image draws from
its own generator seeded by (seed, index), so archives are deterministic and can be made in
parallel. This module computes arrays only; :func:`write_archive` is the thin I/O layer.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .. import io, rle

__all__ = ["SynthImage", "generate", "sample_classes", "write_archive", "CLASS_COMBINATIONS", "FAMILIES",
           "MAX_CLASSES", "class_look", "class_hues", "default_class_names", "check_class_names"]

REF_H, REF_W = 256, 1600
NUM_CLASSES = 4  # Severstal's, and the default
MAX_CLASSES = 16  # four families x four looks (class_look)
#: The defect families (geometry and texture), in the order of Severstal's ClassIds 1..4.
FAMILIES = ("pit", "streak", "scratch", "blotch")
#: The one family of a ``color_only`` archive: blotches are the largest compact defects, so a
#: small CNN sees their hue even at 64x400.
COLOR_ONLY_FAMILY = 4

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
    """``image``: uint8[H, W] grayscale or uint8[H, W, 3] RGB (colour); ``masks``: bool[C, H, W]
    (axis c is ClassId c + 1)."""

    image: np.ndarray
    masks: np.ndarray

    @property
    def class_ids(self) -> list[int]:
        return [c + 1 for c in range(self.masks.shape[0]) if self.masks[c].any()]


CLASS_MIXES = ("severstal", "balanced")


def effective_mix(mix: str, num_classes: int) -> str:
    """The mix actually drawn: Severstal's combinations exist for its 4 classes only, so any
    other class count draws "balanced" (the CLI's default mix stays valid with ``--classes 3``)."""
    if mix not in CLASS_MIXES:
        raise ValueError(f"unknown class mix {mix!r}; use one of {', '.join(CLASS_MIXES)}")
    return mix if num_classes == NUM_CLASSES else "balanced"


def sample_classes(rng: np.random.Generator, clean_fraction: float = 0.45, mix: str = "severstal",
                   num_classes: int = NUM_CLASSES) -> tuple[int, ...]:
    """Defect classes (1-based, in 1..num_classes) of one image: () for a clean one.

    ``mix``: "severstal" draws Severstal's class combinations; "balanced" gives each
    defective image one class uniformly, and a second one 15% of the time (for small
    archives where Severstal's rare classes would have a handful of images). With
    ``num_classes`` other than 4, "severstal" means "balanced" (:func:`effective_mix`).
    """
    if rng.random() < clean_fraction:
        return ()
    mix = effective_mix(mix, num_classes)
    if mix == "severstal":
        return _COMBOS[rng.choice(len(_COMBOS), p=_COMBO_P)]
    k = 2 if rng.random() < 0.15 else 1  # drawn even for one class, so C = 1 uses the same stream
    return tuple(sorted(int(c) + 1 for c in rng.choice(num_classes, size=min(k, num_classes), replace=False)))


# --------------------------------------------------------------------------- classes
def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, (int, np.integer)) or not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"the number of classes must be an integer in 1..{MAX_CLASSES}, got {num_classes!r}")


def class_look(class_id: int, color_only: bool = False) -> tuple[int, bool, bool]:
    """How class ``class_id`` (1-based) looks: (family 1..4, flip the brightness change, checkerboard).

    Classes 1-4 are Severstal's; each later class reuses a family but must not look like its
    earlier classes, or a classifier could not tell them apart: 5-8 flip the brightness sign,
    9-12 modulate the change with a fine checkerboard, 13-16 do both. ``color_only``: every
    class is an unmodified blotch (the classes differ only in hue).
    """
    if color_only:
        return COLOR_ONLY_FAMILY, False, False
    variant = (class_id - 1) // len(FAMILIES)
    return (class_id - 1) % len(FAMILIES) + 1, bool(variant & 1), bool(variant & 2)


def class_hues(num_classes: int) -> np.ndarray:
    """float64[C, 2]: the unit chroma direction (Cr, Cb) of each class, C evenly spaced hues
    starting at red (class 1), so that any two classes are as far apart as C allows."""
    angle = 2 * np.pi * np.arange(num_classes) / num_classes
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)


def default_class_names(num_classes: int, color_only: bool = False) -> list[str]:
    """Names of a named archive's classes when none are given.

    The family names ``pit, streak, scratch, blotch``, then ``pit_2, streak_2...`` for the
    next looks of each family; ``defect`` for one class. ``color_only`` classes are all
    blotches that differ in hue, so family names would mislead: ``hue_1..hue_C``.
    """
    _check_num_classes(num_classes)
    if num_classes == 1:
        return ["defect"]
    if color_only:
        return [f"hue_{k}" for k in range(1, num_classes + 1)]
    names = []
    for k in range(1, num_classes + 1):
        variant = (k - 1) // len(FAMILIES)
        family = FAMILIES[(k - 1) % len(FAMILIES)]
        names.append(family if variant == 0 else f"{family}_{variant + 1}")
    return names


# The archive reader's pattern for a numbered class column (1, class_1, Class1...).
_NUMBERED = re.compile(r"^(?:class[_ ]?)?(\d+)$", re.IGNORECASE)
_RESERVED = ("ImageId", "ClassId", "EncodedPixels")


def check_class_names(names, num_classes: int) -> list[str]:
    """The validated class names (a sequence, or one comma-separated string); ValueError naming the problem.

    Names become CSV header cells and train.csv ClassIds, so they must be C of them, unique
    (ignoring case), non-empty, printable, without commas, quotes or surrounding spaces, not
    one of the CSV's own column names, and not read as another class's number (``2`` or
    ``class_2`` is only allowed as the name of class 2).
    """
    if isinstance(names, str):
        names = names.split(",")
    names = list(names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class name(s) given ({', '.join(map(repr, names))}) for {num_classes} "
                         f"class(es); give exactly one name per class")
    seen: dict[str, int] = {}
    for k, name in enumerate(names, 1):
        where = f"class name {k} ({name!r})"
        if not isinstance(name, str):
            raise ValueError(f"{where} is not a string")
        if not name.strip():
            raise ValueError(f"{where} is empty")
        if name != name.strip():
            raise ValueError(f"{where} has leading or trailing spaces")
        if not name.isprintable():
            raise ValueError(f"{where} has non-printable characters")
        if "," in name or '"' in name:
            raise ValueError(f"{where} contains a comma or a quote, which the CSV header cannot hold")
        if name in _RESERVED:
            raise ValueError(f"{where} is a column name of the archive's CSVs ({', '.join(_RESERVED)})")
        m = _NUMBERED.match(name)
        if m and int(m.group(1)) != k:
            raise ValueError(f"{where} would read as class {int(m.group(1))}")
        if name.lower() in seen:
            raise ValueError(f"{where} repeats class name {seen[name.lower()]} ({names[seen[name.lower()] - 1]!r}); "
                             f"names must be unique")
        seen[name.lower()] = k
    return names


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


def _component(rng, family: int, sy: float, sx: float, H: int, alone: bool) -> np.ndarray:
    """One connected defect component of a family (1..4), in its own bounding box: bool[h, w].

    ``alone``: the mask's only component (a lone pit is larger than the pits of a cluster).
    """
    if family == 1:  # compact pits: median ~40 x 24 at 256x1600
        k = 1.5 if alone else 1.0
        return _blob(rng, k * _lognormal(rng, 44, 0.35, 14, 140) * sy, k * _lognormal(rng, 27, 0.25, 12, 60) * sx, 0.25)
    if family == 2:  # thin streak: ~164 x 20
        h = _lognormal(rng, 175, 0.3, 60, REF_H) * sy
        return _band(rng, h, _lognormal(rng, 17, 0.25, 8, 32) * sx, 2.0 * sx, taper=True)
    if family == 3:
        if rng.random() < 0.15:  # a wide patch
            return _blob(rng, _lognormal(rng, 90, 0.4, 30, REF_H) * sy, _lognormal(rng, 220, 0.6, 60, 700) * sx, 0.3)
        full = rng.random() < 0.25
        h = H if full else _lognormal(rng, 130, 0.5, 30, REF_H) * sy
        return _band(rng, h, _lognormal(rng, 28, 0.4, 10, 90) * sx, 6.0 * sx, taper=not full)
    # family 4: wide irregular blotch: a core blob and a few lobes overlapping it (fill ~0.6)
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


def _n_components(rng, family: int) -> int:
    single = {1: 0.36, 2: 0.8, 3: 0.3, 4: 0.3}[family]
    if rng.random() < single:
        return 1
    median, hi = {1: (4, 14), 2: (2, 3), 3: (3, 9), 4: (2.5, 6)}[family]
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


def _tint(rng, H: int, W: int) -> np.ndarray:
    """The chroma of a colour strip's background: float32[H, W, 2] (Cr, Cb, 0 = grey).

    Steel is a slightly bluish grey; each image gets its own small tint, drifting a little
    along the strip like the banding, so that hue alone (without a defect) is not a cue.
    """
    tint = np.array([rng.uniform(-3, 3), rng.uniform(0, 6)], dtype=np.float32)
    drift = rng.uniform(0.5, 2) * _smooth_noise(rng, W, int(rng.integers(4, 16))).astype(np.float32)
    return np.broadcast_to(tint + drift[None, :, None] * np.array([0.5, 1.0], np.float32), (H, W, 2)).copy()


# JPEG's (JFIF) YCbCr -> RGB: each column has zero luma (0.299 R + 0.587 G + 0.114 B), so
# moving the chroma leaves cv2's RGB2GRAY of the result equal to the luma.
_CHROMA_TO_RGB = np.array([[1.402, -0.714136, 0.0], [0.0, -0.344136, 1.772]], dtype=np.float32)


def _to_rgb(luma: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] RGB from float luma[H, W] and chroma[H, W, 2] (Cr, Cb around 0).

    Where the full chroma would leave 0..255 (dark pits, glare), it is scaled down instead
    of clipping a channel, which would change the luma: the grey conversion stays the luma.
    """
    y = np.clip(luma, 0, 255)[..., None]
    d = chroma @ _CHROMA_TO_RGB  # [H, W, 3] offsets from the grey y
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(d > 0, (255 - y) / d, np.where(d < 0, y / -d, np.inf))
    scale = np.minimum(1.0, room.min(axis=-1, keepdims=True))
    return np.clip(np.rint(y + scale * d), 0, 255).astype(np.uint8)


def _paint(rng, img: np.ndarray, mask: np.ndarray, family: int, y0: int, x0: int,
           flip: bool = False, checker: int = 0) -> None:
    """Change the pixels of one component (mask is its bbox-local footprint at y0, x0).

    ``img``: float32[H, W] intensity (the luma of a colour image), changed in place.
    ``flip``: the opposite brightness change; ``checker``: modulate the change with a
    checkerboard of that cell size (0: none); see :func:`class_look`.
    """
    h, w = mask.shape
    view = img[y0 : y0 + h, x0 : x0 + w]
    if family == 1:  # dark pits with speckle
        tex = -rng.uniform(22, 38) - 18 * (rng.random((h, w)) < 0.35)
    elif family == 2:  # bright streak, brightest on its centre line
        core = np.exp(-(((np.arange(w) - w / 2) / max(w / 3, 1)) ** 2))[None, :]
        tex = rng.uniform(30, 50) * (0.6 + 0.4 * core) * np.ones((h, 1))
    elif family == 3:  # striated: diagonal fine stripes over a lighter band
        yy, xx = np.mgrid[0:h, 0:w]
        tex = rng.uniform(14, 24) + 12 * np.sin((yy + xx * rng.uniform(0.5, 1.5)) * rng.uniform(0.6, 1.0))
    else:  # dark smooth blotch
        tex = -rng.uniform(35, 55) + 4 * rng.standard_normal((h, w))
    tex = np.broadcast_to(tex, (h, w))
    # Only the later looks transform tex, so classes 1-4 keep today's arithmetic (and bytes).
    if flip:
        tex = -tex
    if checker:
        yy, xx = np.mgrid[0:h, 0:w]
        cells = ((yy + y0) // checker + (xx + x0) // checker) % 2
        tex = tex * (0.35 + 0.65 * cells)  # never 0: every mask pixel still changes
    view[mask] += tex[mask].astype(np.float32)


def generate(rng: np.random.Generator, height: int = REF_H, width: int = REF_W, classes=None,
             clean_fraction: float = 0.45, mix: str = "severstal", num_classes: int = NUM_CLASSES,
             color: bool = False, color_only: bool = False) -> SynthImage:
    """One synthetic image and its true masks (see :class:`SynthImage` for shapes and dtypes).

    ``classes``: 1-based ids in 1..num_classes, or None to sample (:func:`sample_classes`).
    ``color``: an RGB image whose classes also differ in hue; its grey conversion (cv2
    RGB2GRAY) is, within a grey level, the grey image of the same ``rng`` seed. ``color_only``
    (implies ``color``): every class looks the same but for its hue. The grey default draws the
    same random numbers as before these options existed, so its images are unchanged.
    """
    if height < 32 or width < 64:
        raise ValueError(f"synthetic images need at least 32x64 pixels, got {height}x{width}")
    _check_num_classes(num_classes)
    color = color or color_only
    if classes is None:
        classes = sample_classes(rng, clean_fraction, mix, num_classes)
    bad = [c for c in classes if not 1 <= c <= num_classes]
    if bad:
        raise ValueError(f"class id(s) {bad} out of range 1..{num_classes}")
    sy, sx = height / REF_H, width / REF_W
    img, (lo, hi) = _background(rng, height, width)
    # Colour draws from a child generator (spawning does not advance rng), so the luma of a
    # colour image is the grey image of the same seed: same background, same defects.
    crng = rng.spawn(1)[0] if color else None
    chroma = _tint(crng, height, width) if color else None
    hues = class_hues(num_classes)
    # The checkerboard's cell: about 6 px at 256x1600, never under 2 px (JPEG would blur 1 px).
    cell = max(2, int(round(6 * min(sy, sx))))
    masks = np.zeros((num_classes, height, width), dtype=bool)
    taken = np.zeros((height, width), dtype=bool)
    for class_id in sorted(classes):
        family, flip, checker = class_look(class_id, color_only)
        n = _n_components(rng, family)
        # Components of one mask cluster around a centre (tight for pits, loose for others).
        spread = {1: 0.09, 2: 0.15, 3: 0.25, 4: 0.2}[family] * width
        spread *= 4 if rng.random() < 0.3 else 1
        cx = rng.uniform(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo))
        for _ in range(n):
            comp = _component(rng, family, sy, sx, height, alone=n == 1)
            h, w = min(comp.shape[0], height), min(comp.shape[1], hi - lo)
            comp = comp[:h, :w]
            if family == 2 and rng.random() < 0.5:  # streaks often run off the top or bottom
                y0 = 0 if rng.random() < 0.5 else height - h
            else:
                y0 = int(np.clip(rng.normal(height / 2, height * 0.15) - h / 2, 0, height - h))
            x0 = int(np.clip(rng.normal(cx, spread) - w / 2, lo, hi - w))
            footprint = comp & ~taken[y0 : y0 + h, x0 : x0 + w]  # classes never share a pixel
            if not footprint.any():
                continue
            _paint(rng, img, footprint, family, y0, x0, flip=flip, checker=cell if checker else 0)
            if color:  # the class's hue on top of the brightness change; colour_only: its only cue
                chroma[y0 : y0 + h, x0 : x0 + w][footprint] += np.float32(crng.uniform(16, 24)) * hues[class_id - 1]
            masks[class_id - 1, y0 : y0 + h, x0 : x0 + w] |= footprint
            taken[y0 : y0 + h, x0 : x0 + w] |= footprint
    if color:
        return SynthImage(image=_to_rgb(img, chroma), masks=masks)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return SynthImage(image=image, masks=masks)


# --------------------------------------------------------------------------- archive I/O
def _look_name(class_id: int, color_only: bool) -> str:
    """A class's look in words, for synth.json: "pit", "streak, flipped", "scratch, checkered"..."""
    family, flip, checker = class_look(class_id, color_only)
    return ", ".join([FAMILIES[family - 1]] + ["flipped"] * flip + ["checkered"] * checker)


def _image_id(index: int) -> str:
    return f"synth_{index:07d}.jpg"


def _encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """JPEG bytes of a uint8[H, W] grey or uint8[H, W, 3] RGB image."""
    from PIL import Image

    buf = _io.BytesIO()
    if image.ndim == 3:  # 4:4:4: chroma at full resolution, or 4:2:0 would smear the hue edges of small defects
        Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _make_chunk(args) -> list:
    seed, first, stop, height, width, clean_fraction, mix, num_classes, color, color_only = args
    out = []
    for index in range(first, stop):
        s = generate(np.random.default_rng([seed, index]), height, width, clean_fraction=clean_fraction, mix=mix,
                     num_classes=num_classes, color=color, color_only=color_only)
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
                  mix: str = "severstal", force: bool | None = None, num_classes: int = NUM_CLASSES,
                  class_names=None, color: bool = False, color_only: bool = False) -> dict:
    """Write a synthetic archive in the Severstal layout and return a summary.

    ``<out>/train_images/*.jpg``, ``<out>/train.csv`` (masks as Kaggle RLE),
    ``<out>/labels.csv`` (the same labels without masks: ImageId + one 0/1 column per class,
    clean images included) and ``<out>/synth.json`` (the parameters). The CSVs are written
    last, so an interrupted run never leaves an archive that claims images it lacks.

    Classes: ``num_classes`` (1..16; 4 is Severstal's) and ``class_names`` (a sequence, or
    a comma-separated string; checked by :func:`check_class_names`). The default archive (4
    classes, grey, no names) is Severstal's layout: labels.csv's header is ``ImageId,1,2,3,4``
    and train.csv's ClassId the integer, byte for byte as before these options existed. Any
    other archive is *named*: the header is ``ImageId,<name 1>,...`` and ClassId holds the
    class's name (:func:`default_class_names` when none are given). ``color``/``color_only``:
    RGB JPEGs (4:4:4), see :func:`generate`.

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
    color = color or color_only
    # Validates the size and the class count early, before anything is written.
    generate(np.random.default_rng(0), height, width, classes=(), num_classes=num_classes)
    sample_classes(np.random.default_rng(0), 0.0, mix, num_classes)  # and the class mix
    named = class_names is not None or num_classes != NUM_CLASSES or color
    if class_names is not None:
        names = check_class_names(class_names, num_classes)
    elif named:
        names = default_class_names(num_classes, color_only)
    else:
        names = [str(c + 1) for c in range(num_classes)]
    # A named archive's train.csv holds the name; Severstal's layout the integer ClassId.
    class_keys = names if named else list(range(1, num_classes + 1))
    t0 = time.perf_counter()
    rows: list[tuple[str, int | str, str]] = []
    labels: list[tuple[str, list[int]]] = []
    chunk = 64
    tasks = [(seed, i, min(i + chunk, images), height, width, clean_fraction, mix, num_classes, color, color_only)
             for i in range(0, images, chunk)]
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
                rows.extend((image_id, class_keys[c], r) for c, r in enumerate(rles) if r)
                labels.append((image_id, [int(c + 1 in classes) for c in range(num_classes)]))
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
    w.writerow(["ImageId"] + names)
    w.writerows([iid, *lab] for iid, lab in labels)
    elapsed = time.perf_counter() - t0
    counts = np.array([lab for _, lab in labels]).sum(axis=0)
    summary = {
        "images": images,
        "height": height,
        "width": width,
        "seed": seed,
        "clean_fraction_requested": clean_fraction,
        "class_mix": effective_mix(mix, num_classes),
        "classes": num_classes,
        "class_names": names,
        "color": color,
        "color_only": color_only,
        "class_looks": [_look_name(k, color_only) for k in range(1, num_classes + 1)],
        "class_hues_deg": [round(float(np.degrees(np.arctan2(b, a))) % 360, 1) for a, b in class_hues(num_classes)]
        if color else None,
        "clean_images": int(sum(1 for _, lab in labels if not any(lab))),
        "images_per_class": {name: int(n) for name, n in zip(names, counts)},
        "masks": len(rows),
        "seconds": round(elapsed, 3),
        "images_per_second": round(images / elapsed, 1),
    }
    io.write_bytes(io.join(out, "synth.json"), json.dumps(summary, indent=2).encode())
    io.write_bytes(io.join(out, "labels.csv"), wide_csv.getvalue().encode())
    io.write_bytes(io.join(out, "train.csv"), long_csv.getvalue().encode())
    return summary
