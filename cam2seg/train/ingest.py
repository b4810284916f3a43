"""How a fold's manifest rows reach its training loop: decoded once into the worker's memory, or
streamed through Ray Data.

Both give the loop (:func:`cam2seg.train.loop.train_loop_per_worker`) the same three iterators of
decoded batches, so the loop and the tasks do not know which one they read:

* ``train(epoch)``: this rank's training batches, shuffled per (seed, epoch);
* ``train_images()``: this rank's training images in order, for the BatchNorm refresh;
* ``val()``: every validation row once, with its image id (the out-of-fold predictions).

Each batch holds ``uint8[B, h, w]`` (grey) or ``uint8[B, h, w, 3]`` (RGB) images and the task's
targets (``float32[B, C]`` labels for the classifier, ``int8[B, C, h, w]`` targets for the
segmenter), decoded by the task's ``decode`` from manifest rows (:mod:`cam2seg.train.manifest`).

:class:`InMemory` decodes the fold once (the whole fold in the worker's RAM: the fast choice for
an archive that fits). :class:`Streamed` reads the shards Ray Train hands each worker
(``ray.train.get_dataset_shard``) of the datasets :func:`fold_datasets` builds: Parquet rows read
and decoded by :func:`decode_rows` in ``map_batches``, so a worker holds a few batches, not the
fold. Its batch order comes from Ray Data's local shuffle buffer, so it differs from
:class:`InMemory`'s and is not reproducible run to run. :func:`ingest_mode` picks one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from .. import io
from . import data, manifest

__all__ = ["InMemory", "Streamed", "decode_rows", "fold_datasets", "data_config", "ingest_mode", "decoded_bytes"]


def decoded_bytes(rows: int, size: tuple[int, int], target_channels: int, image_channels: int = 1) -> int:
    """Bytes a worker holds for ``rows`` decoded images at ``size`` (uint8, ``image_channels``
    planes) with int8 targets of ``target_channels`` planes each (0 for the classifier's labels)."""
    return rows * size[0] * size[1] * (image_channels + target_channels)


def ingest_mode(setting: str, rows: int, size: tuple[int, int], target_channels: int, max_memory_gb: float,
                image_channels: int = 1) -> str:
    """"memory" or "stream" for ``setting`` ("auto" streams when one worker would hold more
    than ``max_memory_gb`` of decoded training images and targets)."""
    if setting != "auto":
        return setting
    over = decoded_bytes(rows, size, target_channels, image_channels) > max_memory_gb * 2**30
    return "stream" if over else "memory"


class InMemory:
    """The fold's rows decoded once, in this worker (every rank holds the whole fold)."""

    def __init__(self, task, url: str, fold: int, folds: int, batch_size: int, seed: int, rank: int, world: int):
        train_rows, val_rows = manifest.read_fold(url, fold, folds)
        train_rows = manifest.training_rows(train_rows)
        self.x_train, self.y_train = task.decode(train_rows)
        self.x_val, self.y_val = task.decode(val_rows)
        self.val_ids = val_rows.column("image_id").to_pylist()
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.counts = (len(self.x_train), len(self.x_val))

    def train(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for idx in data.epoch_batches(len(self.x_train), self.batch_size, epoch, self.seed, self.rank, self.world):
            yield self.x_train[idx], self.y_train[idx]

    def train_images(self) -> Iterator[np.ndarray]:
        for i in range(0, len(self.x_train), self.batch_size):
            yield self.x_train[i : i + self.batch_size]

    def val(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        for i in range(0, len(self.x_val), self.batch_size):
            yield self.x_val[i : i + self.batch_size], self.y_val[i : i + self.batch_size], self.val_ids[i : i + self.batch_size]


def decode_rows(rows: pa.Table, config: dict, train: bool = False) -> dict:
    """``map_batches`` function: manifest rows -> ``{"image": uint8[B, h, w(, 3)], "target": the task's
    targets, "image_id": str[B]}``, decoded as the loop ``config``'s task decodes
    (:mod:`cam2seg.train.decode`, which imports no torch); ``train``: the rows are training rows
    (each repeated as :func:`cam2seg.train.manifest.training_rows` says). A function, not a callable class: it
    holds nothing worth keeping between calls, and tasks run in Ray's pooled worker processes where
    an actor pool would start new ones on every pass."""
    from .decode import DECODERS

    if train:
        rows = manifest.training_rows(rows)
    x, y = DECODERS[config["task"]](rows, config)
    return {"image": x, "target": y, "image_id": np.asarray(rows.column("image_id").to_pylist(), object)}


def fold_datasets(config: dict, *, cpus: float, decoders: int, batch_rows: int, seed: int) -> dict:
    """``{"train": Dataset, "val": Dataset}`` of one fold for ``TorchTrainer(datasets=...)``:
    the manifest's other folds and its own fold, each read from Parquet and decoded by
    :func:`decode_rows` (at most ``decoders`` tasks at once of ``cpus`` CPUs each, ``batch_rows``
    rows a call).
    The training rows' block order is shuffled by ``seed``; the loop shuffles within blocks."""
    import ray.data

    # Each pass of each worker is a Ray Data execution with its own progress bars, written to the
    # workers' log files many times a second; the fold's epoch lines say how training goes.
    ray.data.DataContext.get_current().enable_progress_bars = False
    url, fold, folds = config["manifest"], int(config["fold"]), int(config["folds"])
    paths, fs = {}, None
    for k in range(folds):
        paths[k], fs = io.arrow_filesystem(manifest.fold_url(url, k))

    def decoded(ks: list[int], train: bool):
        return ray.data.read_parquet([paths[k] for k in ks], filesystem=fs, num_cpus=cpus).map_batches(
            decode_rows, fn_kwargs={"config": config, "train": train}, batch_size=batch_rows, batch_format="pyarrow",
            num_cpus=cpus, concurrency=decoders)

    train = decoded([k for k in range(folds) if k != fold], True)
    return {"train": train.randomize_block_order(seed=seed), "val": decoded([fold], False)}


def data_config(ahead_bytes: int | None):
    """Ray Train's ``DataConfig`` for a fold's datasets: "train" split between the workers, "val"
    not (every worker scores the whole held-out fold, so out-of-fold predictions cover each image
    once; a split would drop rows to even the shards out). ``ahead_bytes``: the object-store
    memory each dataset's execution may use (None: Ray Data's default, half the object store
    per execution). Without a bound, decoding runs ahead of a slower trainer into the object
    store, where every block a worker reads is mapped into it (BENCHMARKS.md)."""
    from ray.train import DataConfig

    if ahead_bytes is None:
        return DataConfig(datasets_to_split=["train"])
    opts = DataConfig.default_ingest_options()
    opts.resource_limits = opts.resource_limits.copy(object_store_memory=float(ahead_bytes))
    return DataConfig(datasets_to_split=["train"], execution_options=opts)


class Streamed:
    """The Ray Data shards Ray Train gives this worker: its split of "train", all of "val"."""

    def __init__(self, counts: tuple[int, int], batch_size: int, seed: int, shuffle_rows: int):
        import ray.train

        self.train_it, self.val_it = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        self.counts, self.batch_size, self.seed, self.shuffle_rows = counts, batch_size, seed, shuffle_rows

    def _batches(self, it, **kw) -> Iterator[dict]:
        # A rank that stopped reading its split early would hang the others (ray#41973): every
        # caller reads each pass to its end.
        yield from it.iter_batches(batch_size=self.batch_size, batch_format="numpy", **kw)

    def train(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for b in self._batches(self.train_it, local_shuffle_buffer_size=self.shuffle_rows or None,
                               local_shuffle_seed=self.seed * 1000 + epoch if self.shuffle_rows else None):
            yield b["image"], b["target"]

    def train_images(self) -> Iterator[np.ndarray]:
        for b in self._batches(self.train_it):
            yield b["image"]

    def val(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        for b in self._batches(self.val_it):
            yield b["image"], b["target"], b["image_id"].tolist()
