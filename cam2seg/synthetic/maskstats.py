"""Geometry of defect masks (area, connected components, boxes, fill, position), per class.

The same statistics as measured on real Severstal annotations (``REFERENCE`` below, from 398
masks at 256 x 1600; components use 8-connectivity), so a generated or a user's archive can
be compared with real defects: ``cam2seg synth --stats`` and ``cam2seg stats``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["REFERENCE", "COMPARED", "mask_geometry", "collect", "summarise", "format_comparison"]

Q = (5, 25, 50, 75, 95)

# Real Severstal geometry at 256 x 1600: class -> metric -> (p5, p25, p50, p75, p95).
REFERENCE: dict[int, dict[str, tuple[float, ...]]] = {
    1: {
        "area": (684, 1676, 3529, 6270, 9768),
        "components": (1, 1, 2, 5.5, 12),
        "comp_height": (24, 31, 40, 56, 136),
        "comp_width": (17, 20, 24, 30, 45),
        "comp_area": (344, 540, 788, 1188, 2254),
        "comp_fill": (0.56, 0.69, 0.77, 0.84, 0.92),
        "mask_height": (30, 100, 161, 226, 256),
        "mask_width": (19, 26, 52, 453, 1160),
        "centroid_x": (0.16, 0.26, 0.45, 0.86, 0.92),
        "centroid_y": (0.22, 0.41, 0.49, 0.62, 0.80),
    },
    2: {
        "area": (747, 2259, 2746, 4096, 5925),
        "components": (1, 1, 1, 1, 2),
        "comp_height": (74, 140, 164, 194, 256),
        "comp_width": (13, 16, 20, 25, 34),
        "comp_area": (769, 1638, 2281, 3454, 5729),
        "comp_fill": (0.49, 0.62, 0.74, 0.83, 0.90),
        "mask_height": (74, 158, 172, 233, 256),
        "mask_width": (16, 18, 22, 33, 40),
        "centroid_x": (0.04, 0.31, 0.52, 0.87, 0.94),
        "centroid_y": (0.25, 0.41, 0.50, 0.58, 0.83),
    },
    3: {
        "area": (2342, 5939, 11749, 31687, 107688),
        "components": (1, 1, 2, 4, 7.8),
        "comp_height": (23, 65, 146, 255, 256),
        "comp_width": (14, 23, 37, 74, 365),
        "comp_area": (365, 2048, 4460, 7886, 34017),
        "comp_fill": (0.41, 0.65, 0.78, 0.87, 0.95),
        "mask_height": (65, 163, 254, 256, 256),
        "mask_width": (28, 116, 325, 909, 1463),
        "centroid_x": (0.11, 0.39, 0.54, 0.68, 0.83),
        "centroid_y": (0.23, 0.45, 0.50, 0.57, 0.79),
    },
    4: {
        "area": (4684, 15838, 32706, 58015, 100424),
        "components": (1, 1.2, 2, 3, 5),
        "comp_height": (36, 64, 96, 150, 248),
        "comp_width": (45, 82, 154, 258, 504),
        "comp_area": (1205, 3694, 8300, 20347, 59184),
        "comp_fill": (0.37, 0.54, 0.63, 0.71, 0.82),
        "mask_height": (69, 107, 219, 255, 256),
        "mask_width": (93, 251, 458, 867, 1571),
        "centroid_x": (0.13, 0.34, 0.53, 0.70, 0.83),
        "centroid_y": (0.29, 0.43, 0.54, 0.65, 0.85),
    },
}
REFERENCE_SIZE = (256, 1600)
# Metrics whose medians must agree within a factor of 2 for the archive to count as realistic.
COMPARED = ("area", "components", "comp_height", "comp_width")
# How each metric scales with the image: by area, height, width, or not at all.
_SCALE = {
    "area": "hw", "comp_area": "hw", "comp_height": "h", "mask_height": "h",
    "comp_width": "w", "mask_width": "w",
}
_MASK_METRICS = ("area", "components", "mask_height", "mask_width", "centroid_x", "centroid_y")
_COMP_METRICS = ("comp_height", "comp_width", "comp_area", "comp_fill")


def mask_geometry(mask: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Statistics of one non-empty ``bool[H, W]`` mask: (per-mask values, per-component arrays).

    Per component also ``touch_edge`` (touches the top or bottom row) and ``full_height``.
    """
    from scipy import ndimage

    h, w = mask.shape
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    ys, xs = np.nonzero(mask)
    per_mask = {
        "area": float(len(ys)),
        "components": float(n),
        "mask_height": float(ys.max() - ys.min() + 1),
        "mask_width": float(xs.max() - xs.min() + 1),
        "centroid_x": float(xs.mean() / w),
        "centroid_y": float(ys.mean() / h),
    }
    boxes = ndimage.find_objects(lab)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(float)
    bh = np.array([b[0].stop - b[0].start for b in boxes], dtype=float)
    bw = np.array([b[1].stop - b[1].start for b in boxes], dtype=float)
    top = np.array([b[0].start == 0 for b in boxes])
    bottom = np.array([b[0].stop == h for b in boxes])
    comps = {
        "comp_height": bh,
        "comp_width": bw,
        "comp_area": areas,
        "comp_fill": areas / (bh * bw),
        "touch_edge": (top | bottom).astype(float),
        "full_height": (top & bottom).astype(float),
    }
    return per_mask, comps


def collect(masks: Iterable[tuple[int, np.ndarray]]) -> dict[int, dict[str, list]]:
    """Accumulate (class id, mask) pairs into per-class lists of values."""
    out: dict[int, dict[str, list]] = {}
    for class_id, mask in masks:
        if not mask.any():
            continue
        per_mask, comps = mask_geometry(mask)
        d = out.setdefault(class_id, {})
        for k, v in per_mask.items():
            d.setdefault(k, []).append(v)
        for k, v in comps.items():
            d.setdefault(k, []).extend(v.tolist())
    return out


def summarise(values: dict[int, dict[str, list]]) -> dict[int, dict[str, tuple[float, ...]]]:
    """Per class: metric -> quantiles (p5..p95); plus 'masks', 'single' and edge fractions."""
    out = {}
    for c, d in sorted(values.items()):
        s = {k: tuple(np.percentile(v, Q)) for k, v in d.items() if k in _MASK_METRICS + _COMP_METRICS}
        s["masks"] = (float(len(d["area"])),)
        s["single"] = (float(np.mean(np.asarray(d["components"]) == 1)),)
        s["touch_edge"] = (float(np.mean(d["touch_edge"])),)
        s["full_height"] = (float(np.mean(d["full_height"])),)
        out[c] = s
    return out


def scaled_reference(height: int, width: int) -> dict[int, dict[str, tuple[float, ...]]]:
    """The real statistics rescaled to an archive of ``height x width``."""
    sy, sx = height / REFERENCE_SIZE[0], width / REFERENCE_SIZE[1]
    factor = {"hw": sy * sx, "h": sy, "w": sx}
    return {
        c: {k: tuple(x * factor.get(_SCALE.get(k, ""), 1.0) for x in v) for k, v in d.items()}
        for c, d in REFERENCE.items()
    }


def median_ratios(summary, height: int, width: int) -> dict[int, dict[str, float]]:
    """generated median / real median (rescaled), per class, for the COMPARED metrics."""
    ref = scaled_reference(height, width)
    return {
        c: {k: summary[c][k][2] / ref[c][k][2] for k in COMPARED}
        for c in ref
        if c in summary
    }


def format_comparison(summary, height: int, width: int) -> str:
    """Side-by-side table: real (rescaled to this size) vs this archive, p25 / p50 / p75."""
    ref = scaled_reference(height, width)
    ratios = median_ratios(summary, height, width)
    lines = [
        f"Mask geometry per class at {height}x{width}: real Severstal (rescaled from 256x1600) vs this archive.",
        "Quantiles p25 / p50 / p75; 'ratio' = this archive's median / real median "
        f"(realistic when within 0.5..2 for {', '.join(COMPARED)}).",
    ]
    head = f"{'class':>5} | {'metric':<12} | {'real p25/p50/p75':>26} | {'this archive p25/p50/p75':>26} | ratio"
    lines += [head, "-" * len(head)]

    def q3(v):
        return " / ".join(f"{x:,.0f}" if abs(x) >= 10 else f"{x:.2f}" for x in v[1:4])

    for c in sorted(ref):
        if c not in summary:
            lines.append(f"{c:>5} | (no masks of this class in the archive)")
            continue
        for k in ("area", "components", "comp_height", "comp_width", "comp_area", "comp_fill",
                  "mask_height", "mask_width", "centroid_x", "centroid_y"):
            r = ratios[c].get(k)
            flag = "" if r is None else (f"{r:.2f}" + ("" if 0.5 <= r <= 2 else "  <-- off"))
            lines.append(f"{c:>5} | {k:<12} | {q3(ref[c][k]):>26} | {q3(summary[c][k]):>26} | {flag}")
        s = summary[c]
        lines.append(
            f"{c:>5} | {'masks':<12} | {int(s['masks'][0])} masks, {s['single'][0]:.2f} single-component, "
            f"components touching top/bottom {s['touch_edge'][0]:.2f}, spanning full height {s['full_height'][0]:.2f}"
        )
    return "\n".join(lines)
