"""Kaggle run-length encoding of binary masks.

Convention (Kaggle "Severstal: Steel Defect Detection"): pixels are numbered column-major,
top to bottom then left to right, starting at 1; the string is space-separated
``start length`` pairs with strictly increasing, non-overlapping runs; an empty mask is the
empty string. Masks are ``bool[H, W]`` at the original image's size.

Both directions are vectorised: the cost is a few numpy passes over the pixels, with no
Python loop per pixel or per run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RLEError", "encode", "decode", "encode_many", "decode_many", "runs", "area"]


class RLEError(ValueError):
    """A malformed run-length string; the message says what is wrong and where."""


def _column_major(masks: np.ndarray) -> np.ndarray:
    """bool[..., H, W] -> uint8[N, H*W] with pixels in Kaggle order (column-major)."""
    n = int(np.prod(masks.shape[:-2], dtype=np.int64))
    hw = masks.shape[-2] * masks.shape[-1]
    # Transposing H and W then C-flattening is column-major order per mask.
    return np.ascontiguousarray(np.swapaxes(masks, -1, -2)).reshape(n, hw).view(np.uint8)


def encode_many(masks: np.ndarray) -> list[str]:
    """Encode ``bool[N, H, W]`` (or any ``bool[..., H, W]``) masks; returns N strings in C order."""
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ValueError(f"masks must be [..., H, W], got shape {masks.shape}")
    if masks.dtype != np.bool_:
        masks = masks.astype(bool)
    flat = _column_major(masks).view(bool)
    n, hw = flat.shape
    if n == 0:
        return []
    # A run starts where a pixel differs from the one before it (or is first and set) and
    # ends where it differs again; edges alternate start, end within each mask.
    edges = np.empty((n, hw + 1), dtype=bool)
    edges[:, 0] = flat[:, 0]
    edges[:, -1] = flat[:, -1]
    np.not_equal(flat[:, 1:], flat[:, :-1], out=edges[:, 1:-1])
    rows, cols = np.nonzero(edges)
    # cols are 0-based edge positions: the 1-based pixel number of a start minus one, and one
    # past the last pixel of a run (0-based).
    starts, ends = cols[0::2], cols[1::2]
    pairs = np.empty((len(starts), 2), dtype=np.int64)
    pairs[:, 0] = starts + 1
    pairs[:, 1] = ends - starts
    bounds = np.concatenate([[0], np.cumsum(np.bincount(rows[0::2], minlength=n))])
    return [" ".join(map(str, pairs[a:b].ravel().tolist())) for a, b in zip(bounds[:-1], bounds[1:])]


def encode(mask: np.ndarray) -> str:
    """Encode one ``bool[H, W]`` mask to a Kaggle RLE string ("" for an empty mask)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    return encode_many(mask[None])[0]


def runs(rle: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate an RLE string; returns (starts, lengths) as int64, starts 1-based.

    Raises RLEError for an odd token count, a non-integer token, a start or length below 1,
    a run past the image's H*W pixels, or runs out of order or overlapping.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        rle = ""
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if not tokens:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if len(tokens) % 2:
        raise RLEError(f"odd number of tokens ({len(tokens)}): RLE is 'start length' pairs")
    try:
        values = np.array([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not _is_int(t))
        raise RLEError(f"non-integer token {bad!r} in RLE") from None
    starts, lengths = values[0::2], values[1::2]
    if (starts < 1).any():
        i = int(np.argmax(starts < 1))
        raise RLEError(f"run {i}: start {starts[i]} is below 1 (pixels are numbered from 1)")
    if (lengths < 1).any():
        i = int(np.argmax(lengths < 1))
        raise RLEError(f"run {i}: length {lengths[i]} is below 1")
    ends = starts + lengths - 1  # last pixel of each run, 1-based, inclusive
    total = height * width
    if (ends > total).any():
        i = int(np.argmax(ends > total))
        raise RLEError(
            f"run {i} ({starts[i]} {lengths[i]}) ends at pixel {ends[i]}, past the image's "
            f"{total} pixels ({height}x{width})"
        )
    if len(starts) > 1:
        bad = starts[1:] <= ends[:-1]
        if bad.any():
            i = int(np.argmax(bad)) + 1
            what = "out of order" if starts[i] < starts[i - 1] else "overlaps the previous run"
            raise RLEError(f"run {i} ({starts[i]} {lengths[i]}) {what} (previous ends at {ends[i - 1]})")
    return starts, lengths


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def area(rle: str, height: int, width: int) -> int:
    """Number of mask pixels of a validated RLE string, without decoding it."""
    return int(runs(rle, height, width)[1].sum())


def decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode a Kaggle RLE string to ``bool[height, width]``; "" (or None/NaN) is an empty mask."""
    starts, lengths = runs(rle, height, width)
    total = height * width
    # Alternating gap / run segments expanded with np.repeat: one pass writing each pixel once.
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0:-1:2] = starts - 1 - np.concatenate([[0], (starts + lengths - 1)[:-1]])
    counts[1::2] = lengths
    counts[-1] = total - (starts[-1] + lengths[-1] - 1) if len(starts) else total
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T


def decode_many(rles: Sequence[str], height: int, width: int) -> np.ndarray:
    """Decode N strings of one image size to ``bool[N, height, width]``."""
    out = np.zeros((len(rles), height, width), dtype=bool)
    for i, rle in enumerate(rles):
        try:
            out[i] = decode(rle, height, width)
        except RLEError as e:
            raise RLEError(f"mask {i}: {e}") from None
    return out
