"""K-fold splits stratified over image-level multi-labels, saved so every stage reuses them.

The split comes from ``iterative-stratification`` (Sechidis et al.'s iterative method, the
multi-label generalisation of stratified K-fold); clean images are given a label column of
their own so that they, too, spread evenly over the folds.
"""

from __future__ import annotations

import csv
import io as _io

import numpy as np

from . import io

__all__ = ["make_folds", "folds_csv", "save_folds", "load_folds", "FOLDS_FILE"]

FOLDS_FILE = "folds.csv"


def make_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index ``int64[N]`` in ``0..k-1`` for 0/1 labels ``[N, C]``; deterministic by seed."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [N, C], got {labels.shape}")
    n = len(labels)
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    if n < k:
        raise ValueError(f"{n} images cannot be split into {k} folds")
    strata = np.concatenate([labels > 0, ~(labels > 0).any(axis=1, keepdims=True)], axis=1).astype(int)
    folds = np.full(n, -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, val) in enumerate(splitter.split(np.zeros(n), strata)):
        folds[val] = f
    assert (folds >= 0).all()
    return folds


def folds_csv(image_ids: list[str], folds: np.ndarray) -> bytes:
    """``ImageId,fold`` rows as CSV bytes."""
    if len(image_ids) != len(folds):
        raise ValueError(f"{len(image_ids)} image ids but {len(folds)} fold indices")
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ImageId", "fold"])
    w.writerows(zip(image_ids, (int(f) for f in folds)))
    return buf.getvalue().encode()


def save_folds(url: str, image_ids: list[str], folds: np.ndarray) -> None:
    """Write ``ImageId,fold`` rows to a CSV file (atomically)."""
    io.write_bytes(url, folds_csv(image_ids, folds))


def load_folds(url: str) -> dict[str, int]:
    """ImageId -> fold, from a file written by :func:`save_folds`."""
    rows = list(csv.reader(_io.StringIO(io.read_bytes(url).decode())))
    if not rows or rows[0] != ["ImageId", "fold"]:
        raise ValueError(f"{url}: not a folds file (expected header ImageId,fold)")
    return {r[0]: int(r[1]) for r in rows[1:] if r}
