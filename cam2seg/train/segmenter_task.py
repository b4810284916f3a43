"""Stage 3's task for the fold loop (:func:`cam2seg.train.loop.train_loop_per_worker`): the segmenter.

Targets are built in the worker from the manifest's Kaggle RLE strings (true masks, or
pseudo-masks refined by :func:`cam2seg.train.targets.refine_targets`), resized to the training
size. Loss: BCE + Dice (:func:`cam2seg.models.losses.segmentation_loss`), both skipping ignored
pixels; Adam with one learning rate; the validation loss on the held-out fold's targets. At
the end the ``swa_epochs`` best epochs are averaged (1: the best epoch), with BatchNorm
statistics recomputed when more than one was.

Loop config keys besides the loop's own: ``segmenter`` (SegmenterConfig as a dict),
``num_classes``, ``size`` (the training HEIGHT, WIDTH) and ``refine`` (true: the masks are
pseudo-masks, refined with the image-level labels; false: true masks, used as they are).
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import torch

from .. import preprocess, rle
from ..config import SegmenterConfig
from ..models.losses import IGNORE, segmentation_loss
from ..models.segmenter import create_segmenter
from . import loop as training
from .targets import refine_targets

__all__ = ["SegmenterTask", "build_targets"]


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


class SegmenterTask:
    section, log_name = "segmenter", "segmenter fold"

    def __init__(self, config: dict):
        self.cfg = SegmenterConfig(**config[self.section])
        self.num_classes, self.size = int(config["num_classes"]), tuple(config["size"])
        self.refine = bool(config["refine"])
        self.ignored = 0.0

    def create_model(self):
        c = self.cfg
        return create_segmenter(c.architecture, c.encoder, self.num_classes, c.encoder_weights, c.decoder_channels)

    def param_groups(self, core) -> list[dict]:
        return [{"params": core.parameters(), "lr": self.cfg.lr}]

    @staticmethod
    def lr_fields(lrs: list[float]) -> dict:
        return {"lr": lrs[0]}

    def decode(self, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Manifest rows -> (images ``uint8[N, h, w]``, targets ``int8[N, C, h, w]`` in {0, 1, IGNORE})."""
        x = preprocess.load_images(rows.column("uri").to_pylist(), self.size, self.cfg.load_threads)
        shapes = list(zip(rows.column("height").to_pylist(), rows.column("width").to_pylist()))
        labels = rows.column("labels").to_pylist() if self.refine else None
        return x, build_targets(rows.column("rles").to_pylist(), shapes, self.size, labels, self.cfg)

    def load_note(self, y_train: np.ndarray) -> str:
        self.ignored = float((y_train == IGNORE).mean())
        return f" ({self.ignored:.1%} of training pixels ignored)"

    @staticmethod
    def augment(augment, imgs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same random transform on each image ``uint8[h, w]`` and its targets ``int8[C, h, w]``."""
        if augment is None:
            return imgs, targets
        out_i, out_t = [], []
        for im, t in zip(imgs, targets):
            r = augment(image=im, mask=np.ascontiguousarray(t.transpose(1, 2, 0)))
            out_i.append(r["image"])
            out_t.append(r["mask"].transpose(2, 0, 1))
        return np.stack(out_i), np.stack(out_t)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(logits, y, self.cfg.bce_weight, self.cfg.dice_weight)

    @torch.no_grad()
    def validate(self, core, x_val, y_val, device, amp) -> training.Validation:
        core.eval()
        total, seen, bs = 0.0, 0, self.cfg.batch_size
        for i in range(0, len(x_val), bs):
            x = preprocess.to_input(x_val[i : i + bs], device=device)
            y = torch.from_numpy(y_val[i : i + bs]).to(device)
            with training.autocast(device, amp):
                logits = core(x)
            total += float(self.loss(logits.float(), y)) * len(x)
            seen += len(x)
        return training.Validation(total / max(seen, 1))

    def finish(self, core, keeper, x_train, x_val, y_val, val_rows, device, amp, say) -> training.Finish:
        if len(keeper.entries) > 1:
            training.update_bn(core, x_train, self.cfg.batch_size, device)
        val = self.validate(core, x_val, y_val, device, amp)
        say(f"kept epochs {[e + 1 for e in keeper.epochs]}: val_loss {val.loss:.4f}")
        return training.Finish(val.loss, {"ignored_fraction": self.ignored})
