"""Stage 1's task for the fold loop (:func:`cam2seg.train.loop.train_loop_per_worker`): the paper's classifier.

BCE over images x classes, Adam with the encoder's and the head's learning rates, validation
loss and per-class ROC-AUC each epoch. At the end the averaged (SWA) weights are scored on the
held-out fold twice, with the averaged BatchNorm statistics and with statistics recomputed over
the training images, so the choice of ``swa_update_bn`` rests on numbers; the chosen model's
held-out probabilities are the fold's out-of-fold predictions (``oof.json``).

Loop config keys besides the loop's own: ``classifier`` (ClassifierConfig as a dict) and
``num_classes``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .. import metrics, preprocess
from ..config import ClassifierConfig
from ..models.classifier import create_classifier
from . import loop as training

__all__ = ["ClassifierTask", "param_groups", "predict", "OOF_FILE"]

OOF_FILE = "oof.json"


def param_groups(core, cfg: ClassifierConfig) -> list[dict]:
    """The paper's two learning rates: encoder and head."""
    return [{"params": core.encoder.parameters(), "lr": cfg.lr_encoder},
            {"params": core.head.parameters(), "lr": cfg.lr_head}]


@torch.no_grad()
def predict(model, images: np.ndarray, batch_size: int, device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) ``float32[N, C]`` of an eval-mode model over ``uint8[N, H, W]`` images."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        with training.autocast(device, amp):
            out.append(model(preprocess.to_input(images[i : i + batch_size], device=device)).float().cpu())
    logits = torch.cat(out) if out else torch.zeros(0)
    return logits.numpy(), torch.sigmoid(logits).numpy()


def _val_stats(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels.astype(np.float32)))
    return float(loss), metrics.roc_auc(labels, 1 / (1 + np.exp(-logits)))


class ClassifierTask:
    section, log_name = "classifier", "fold"

    def __init__(self, config: dict):
        self.cfg = ClassifierConfig(**config[self.section])
        self.num_classes = int(config["num_classes"])

    def create_model(self):
        c = self.cfg
        return create_classifier(c.encoder, self.num_classes, c.hidden, c.dropout, c.pretrained, c.output_stride, c.pool)

    def param_groups(self, core) -> list[dict]:
        return param_groups(core, self.cfg)

    @staticmethod
    def lr_fields(lrs: list[float]) -> dict:
        return {"lr_encoder": lrs[0], "lr_head": lrs[1]}

    def decode(self, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Manifest rows -> (images ``uint8[N, h, w]`` at ``size``, labels ``float32[N, C]``)."""
        x = preprocess.load_images(rows.column("uri").to_pylist(), self.cfg.size, self.cfg.load_threads)
        return x, np.asarray(rows.column("labels").to_pylist(), np.float32).reshape(len(x), self.num_classes)

    @staticmethod
    def load_note(y) -> str:
        return ""

    @staticmethod
    def augment(augment, imgs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if augment is None:
            return imgs, labels
        return np.stack([augment(image=im)["image"] for im in imgs]), labels

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, y)

    def validate(self, core, x_val, y_val, device, amp) -> training.Validation:
        logits, _ = predict(core, x_val, self.cfg.batch_size, device, amp)
        loss, auc = _val_stats(logits, y_val.astype(np.uint8))
        text = "/".join("  nan" if np.isnan(a) else f"{a:.3f}" for a in auc)
        mean = np.nanmean(auc) if np.isfinite(auc).any() else float("nan")
        return training.Validation(loss, {"auc": [float(a) for a in auc]}, f" auc {text} (mean {mean:.3f})")

    def finish(self, core, keeper, x_train, x_val, y_val, val_rows, device, amp, say) -> training.Finish:
        """Both BatchNorm variants of the averaged weights on the held-out fold; ``core`` is left
        with the chosen one."""
        cfg, labels = self.cfg, y_val.astype(np.uint8)
        logits, probs = predict(core, x_val, cfg.batch_size, device, amp)
        variants = {"averaged_bn": _val_stats(logits, labels)}
        averaged = {k: v.clone() for k, v in core.state_dict().items()}
        training.update_bn(core, x_train, cfg.batch_size, device)
        logits_bn, probs_bn = predict(core, x_val, cfg.batch_size, device, amp)
        variants["recomputed_bn"] = _val_stats(logits_bn, labels)
        if cfg.swa_update_bn:
            probs = probs_bn
        else:
            core.load_state_dict(averaged)
        val_loss, auc = variants["recomputed_bn" if cfg.swa_update_bn else "averaged_bn"]
        for name, (loss_v, auc_v) in variants.items():
            say(f"SWA over epochs {[e + 1 for e in keeper.epochs]}, {name}: val_loss {loss_v:.4f} "
                f"auc {'/'.join(f'{a:.3f}' for a in auc_v)} (mean {np.nanmean(auc_v):.3f})")
        return training.Finish(
            val_loss,
            {"auc": [float(a) for a in auc],
             "swa_bn_variants": {k: {"val_loss": lv, "auc": [float(a) for a in av]} for k, (lv, av) in variants.items()}},
            {OOF_FILE: {"image_ids": val_rows.column("image_id").to_pylist(), "probs": probs.tolist()}})
