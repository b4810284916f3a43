"""Stage 3's task for the fold loop (:func:`cam2seg.train.loop.train_loop_per_worker`): the segmenter.

Targets are built in the worker from the manifest's Kaggle RLE strings (true masks, or
pseudo-masks refined by :func:`cam2seg.train.targets.refine_targets`), resized to the training
size. Loss: BCE + Dice (:func:`cam2seg.models.losses.segmentation_loss`), both skipping ignored
pixels; Adam with one learning rate; the validation loss on the held-out fold's targets. At
the end the ``swa_epochs`` best epochs are averaged (1: the best epoch), with BatchNorm
statistics recomputed when more than one was.

Loop config keys besides the loop's own: ``segmenter`` (SegmenterConfig as a dict),
``num_classes``, ``channels`` (1 grey, 3 RGB), ``size`` (the training HEIGHT, WIDTH) and ``refine`` (true: the masks are
pseudo-masks, refined with the image-level labels; false: true masks, used as they are).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from .. import preprocess
from ..config import SegmenterConfig
from ..models.losses import segmentation_loss
from ..models.segmenter import create_segmenter
from . import loop as training
from . import decode
from .targets import IGNORE

__all__ = ["SegmenterTask"]


class SegmenterTask:
    section, log_name = "segmenter", "segmenter fold"

    def __init__(self, config: dict):
        self.cfg, self.config = SegmenterConfig(**config[self.section]), config
        self.num_classes, self.size = int(config["num_classes"]), tuple(config["size"])
        self.refine = bool(config["refine"])
        self.channels = int(config.get("channels", 1))
        self.ignored_px = self.total_px = 0

    def create_model(self):
        c = self.cfg
        return create_segmenter(c.architecture, c.encoder, self.num_classes, c.encoder_weights, c.decoder_channels,
                                in_channels=self.channels)

    def param_groups(self, core) -> list[dict]:
        return [{"params": core.parameters(), "lr": self.cfg.lr}]

    @staticmethod
    def lr_fields(lrs: list[float]) -> dict:
        return {"lr": lrs[0]}

    def decode(self, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Manifest rows -> (images ``uint8[N, h, w(, 3)]``, targets ``int8[N, C, h, w]`` in {0, 1, IGNORE})."""
        return decode.segmenter_rows(rows, self.config)

    def observe(self, targets: np.ndarray) -> None:
        """Count the ignored pixels of training targets ``int8[B, C, h, w]`` as they are read."""
        self.ignored_px += int((targets == IGNORE).sum())
        self.total_px += int(targets.size)

    @property
    def ignored(self) -> float | None:
        return self.ignored_px / self.total_px if self.total_px else None

    def load_note(self) -> str:
        return "" if self.ignored is None else f" ({self.ignored:.1%} of training pixels ignored)"

    @staticmethod
    def augment(augment, imgs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same random transform on each image ``uint8[h, w(, 3)]`` and its targets ``int8[C, h, w]``."""
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
    def validate(self, core, source, device, amp) -> training.Validation:
        core.eval()
        total, seen = 0.0, 0
        for images, targets, _ in source.val():
            x = preprocess.to_input(images, device=device)
            y = torch.from_numpy(np.ascontiguousarray(targets)).to(device)
            with training.autocast(device, amp):
                logits = core(x)
            total += float(self.loss(logits.float(), y)) * len(x)
            seen += len(x)
        return training.Validation(total / max(seen, 1))

    def finish(self, core, keeper, source, device, amp, say) -> training.Finish:
        if len(keeper.entries) > 1:
            training.update_bn(core, source.train_images(), device)
        val = self.validate(core, source, device, amp)
        say(f"kept epochs {[e + 1 for e in keeper.epochs]}: val_loss {val.loss:.4f}")
        return training.Finish(val.loss, {"ignored_fraction": self.ignored})
