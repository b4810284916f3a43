"""Stage 3 on one fold: Ray Train's ``train_loop_per_worker`` for the segmenter.

Targets are built in the worker from Kaggle RLE strings (true masks, or pseudo-masks refined
by :func:`cam2seg.train.targets.refine_targets`), resized to the training size. Per epoch: BCE + Dice
(:func:`cam2seg.models.losses.segmentation_loss`), Adam, validation loss on the held-out fold's
targets, the learning rate halved after ``plateau_epochs`` without improvement, a checkpoint.
At the end the ``swa_epochs`` best epochs are averaged (1: the best epoch) and a final
checkpoint is written; a worker restarted from it has nothing left to do. Checkpoints and
resume are :mod:`cam2seg.train.loop`'s, as for the classifiers.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import torch

from . import data
from .. import preprocess, rle
from . import swa, loop as training
from ..config import SegmenterConfig
from .targets import refine_targets
from ..models.losses import segmentation_loss
from ..models.segmenter import create_segmenter

__all__ = ["train_segmenter_loop", "build_targets", "SWA_FILE"]

SWA_FILE = "swa.safetensors"


def build_targets(rles: list[list[str]], shapes: list[tuple[int, int]], size: tuple[int, int],
                  labels: list[list[int]] | None, cfg: SegmenterConfig) -> np.ndarray:
    """Targets ``int8[N, C, h, w]`` at ``size`` from per-image, per-class RLE at each image's
    original ``shapes``; ``labels`` (image-level, ``[N][C]``) switch the pseudo-mask
    refinements on (None: true masks, used as they are)."""
    n, c = len(rles), len(rles[0]) if rles else 0
    out = np.zeros((n, c, *size), np.int8)
    for i, (per_class, (h, w)) in enumerate(zip(rles, shapes)):
        masks = np.zeros((c, *size), bool)
        for k, r in enumerate(per_class):
            if r:
                m = rle.decode(r, h, w)
                if (h, w) != tuple(size):
                    m = cv2.resize(m.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
                masks[k] = m
        if labels is None:
            out[i] = masks
        else:
            out[i] = refine_targets(masks, np.asarray(labels[i]), absent_zero=cfg.absent_zero,
                                    present_empty=cfg.present_empty, ignore_band=cfg.ignore_band)
    return out


@torch.no_grad()
def _val_loss(model, x_val: np.ndarray, y_val: np.ndarray, cfg: SegmenterConfig, device, amp: bool) -> float:
    model.eval()
    total, seen = 0.0, 0
    for i in range(0, len(x_val), cfg.batch_size):
        x = preprocess.to_input(x_val[i : i + cfg.batch_size], device=device)
        y = torch.from_numpy(y_val[i : i + cfg.batch_size]).to(device)
        with training.autocast(device, amp):
            logits = model(x)
        total += float(segmentation_loss(logits.float(), y, cfg.bce_weight, cfg.dice_weight)) * len(x)
        seen += len(x)
    return total / max(seen, 1)


def _augment_pair(augment, imgs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same random transform on each image ``uint8[h, w]`` and its targets ``int8[C, h, w]``."""
    out_i, out_t = [], []
    for im, t in zip(imgs, targets):
        r = augment(image=im, mask=np.ascontiguousarray(t.transpose(1, 2, 0)))
        out_i.append(r["image"])
        out_t.append(r["mask"].transpose(2, 0, 1))
    return np.stack(out_i), np.stack(out_t)


def train_segmenter_loop(config: dict) -> None:
    """Ray Train worker function. ``config``: ``segmenter`` (SegmenterConfig as a dict), ``fold``,
    ``size``, ``num_classes``, ``train_urls``/``val_urls``, ``train_rles``/``val_rles``
    (``[N][C]`` RLE), ``train_shapes``/``val_shapes``, ``train_labels``/``val_labels`` (image-level
    labels for the refinements, or None for true masks)."""
    import ray.train
    import ray.train.torch

    cfg = SegmenterConfig(**config["segmenter"])
    training.quiet_ray_reports()
    fold, size = int(config["fold"]), tuple(config["size"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed * 1000 + fold)
    amp = cfg.mixed_precision and device.type == "cuda"
    say = training.fold_say(f"[segmenter fold {fold}]", rank)

    model = create_segmenter(cfg.architecture, cfg.encoder, int(config["num_classes"]), cfg.encoder_weights,
                             cfg.decoder_channels)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    opt = torch.optim.Adam(core.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                       patience=cfg.plateau_epochs - 1)
    fs = training.FoldState(core, opt, sched, swa.TopK(cfg.swa_epochs), training.make_scaler(amp), rank)
    if not fs.resume(say, cfg.epochs):
        return
    start, history, keeper = fs.start, fs.history, fs.keeper

    t_load = time.perf_counter()
    x_train = preprocess.load_images(config["train_urls"], size, cfg.load_threads)
    x_val = preprocess.load_images(config["val_urls"], size, cfg.load_threads)
    y_train = build_targets(config["train_rles"], config["train_shapes"], size, config["train_labels"], cfg)
    y_val = build_targets(config["val_rles"], config["val_shapes"], size, config["val_labels"], cfg)
    ignored = float((y_train == -1).mean())
    say(f"loaded {len(x_train)} training and {len(x_val)} validation images at {size[0]}x{size[1]} "
        f"in {time.perf_counter() - t_load:.1f}s ({ignored:.1%} of training pixels ignored); device {device}, "
        f"{world} worker(s)")
    augment = data.build_augment(cfg.augment, seed=cfg.seed * 1000 + fold + 7919 * start)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total, seen = 0.0, 0
        for idx in data.epoch_batches(len(x_train), cfg.batch_size, epoch, cfg.seed * 1000 + fold, rank, world):
            imgs, tgts = x_train[idx], y_train[idx]
            if augment is not None:
                imgs, tgts = _augment_pair(augment, imgs, tgts)
            x = preprocess.to_input(imgs, device=device)
            y = torch.from_numpy(np.ascontiguousarray(tgts)).to(device)
            opt.zero_grad(set_to_none=True)
            with training.autocast(device, amp):
                logits = model(x)
            loss = segmentation_loss(logits.float(), y, cfg.bce_weight, cfg.dice_weight)
            fs.step(loss)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        train_loss = total / max(seen, 1)
        val_loss = _val_loss(core, x_val, y_val, cfg, device, amp)
        lr = opt.param_groups[0]["lr"]
        sched.step(val_loss)
        kept = keeper.offer(val_loss, epoch, core.state_dict())
        secs = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr, "seconds": secs,
                        "kept": kept})
        say(f"epoch {epoch + 1}/{cfg.epochs} train_loss {train_loss:.4f} val_loss {val_loss:.4f} lr {lr:.1e} "
            f"{secs:.1f}s {seen * world / secs:.1f} img/s")
        fs.report({"fold": fold, "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}, epoch)

    core.load_state_dict(keeper.average())
    if len(keeper.entries) > 1:
        training.update_bn(core, x_train, cfg.batch_size, device)
    val_loss = _val_loss(core, x_val, y_val, cfg, device, amp)
    say(f"kept epochs {[e + 1 for e in keeper.epochs]}: val_loss {val_loss:.4f}")
    final = {"fold": fold, "workers": world, "swa_epochs": keeper.epochs, "val_loss": val_loss, "history": history,
             "ignored_fraction": ignored}
    fs.report({"fold": fold, "epoch": cfg.epochs, "val_loss": val_loss, "final": True}, cfg.epochs - 1, final=final,
              tensors={SWA_FILE: core.state_dict()})
