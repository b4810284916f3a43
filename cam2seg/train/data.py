"""What a training worker feeds its model besides the images: augmentation and each epoch's
batch order (seeded, so a resumed epoch sees the same batches)."""

from __future__ import annotations

import numpy as np

__all__ = ["build_augment", "epoch_batches"]

_AUG_NAMES = {"hflip": "HorizontalFlip", "vflip": "VerticalFlip"}


def build_augment(specs: list, seed: int | None = None) -> object | None:
    """An albumentations pipeline from names ('hflip', 'vflip') or {'name': Transform, **params};
    ``seed`` makes its random choices reproducible."""
    import albumentations as A

    transforms = []
    for spec in specs:
        if isinstance(spec, str):
            name, params = _AUG_NAMES.get(spec, spec), {"p": 0.5}
        else:
            params = dict(spec)
            name = _AUG_NAMES.get(params.get("name"), params.pop("name", None))
            params.pop("name", None)
        cls = getattr(A, str(name), None)
        if cls is None:
            raise ValueError(f"unknown augmentation {spec!r} (use hflip, vflip or an albumentations class name)")
        transforms.append(cls(**params))
    return A.Compose(transforms, seed=seed) if transforms else None


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[np.ndarray]:
    """Index batches of one epoch for one rank: a seeded permutation split evenly over ranks
    (every rank gets the same number of batches, as DDP needs)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = len(order) // world if world > 1 else len(order)
    mine = order[rank * per_rank : (rank + 1) * per_rank] if world > 1 else order
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
