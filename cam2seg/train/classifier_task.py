"""Stage 1's task for the fold loop (:func:`cam2seg.train.loop.train_loop_per_worker`): the paper's classifier.

BCE over images x classes, Adam with the encoder's and the head's learning rates, validation
loss and per-class ROC-AUC each epoch. At the end the averaged (SWA) weights are scored on the
held-out fold twice, with the averaged BatchNorm statistics and with statistics recomputed over
the training images, so the choice of ``swa_update_bn`` rests on numbers; the chosen model's
held-out probabilities are the fold's out-of-fold predictions (``oof.json``).

Loop config keys besides the loop's own: ``classifier`` (ClassifierConfig as a dict),
``num_classes`` and ``channels`` (1 grey, 3 RGB).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from .. import metrics, preprocess
from ..config import ClassifierConfig
from ..models.classifier import create_classifier
from . import decode
from . import loop as training

__all__ = ["ClassifierTask", "param_groups", "predict", "predict_batches", "OOF_FILE"]

OOF_FILE = "oof.json"


def param_groups(core, cfg: ClassifierConfig) -> list[dict]:
    """The paper's two learning rates: encoder and head."""
    return [{"params": core.encoder.parameters(), "lr": cfg.lr_encoder},
            {"params": core.head.parameters(), "lr": cfg.lr_head}]


@torch.no_grad()
def predict(model, images: np.ndarray, batch_size: int, device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) ``float32[N, C]`` of an eval-mode model over ``uint8[N, H, W(, 3)]`` images."""
    return predict_batches(model, (images[i : i + batch_size] for i in range(0, len(images), batch_size)), device, amp)


@torch.no_grad()
def predict_batches(model, batches, device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict` over an iterable of ``uint8[B, H, W(, 3)]`` image batches."""
    model.eval()
    out = []
    for images in batches:
        with training.autocast(device, amp):
            out.append(model(preprocess.to_input(images, device=device)).float().cpu())
    logits = torch.cat(out) if out else torch.zeros(0)
    return logits.numpy(), torch.sigmoid(logits).numpy()


def _predict_val(model, source, device, amp) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(logits, probabilities, labels ``uint8[N, C]``, image ids) over the fold's validation rows."""
    labels, ids = [], []

    def images():
        for x, y, batch_ids in source.val():
            labels.append(y)
            ids.extend(batch_ids)
            yield x

    logits, probs = predict_batches(model, images(), device, amp)
    return logits, probs, np.concatenate(labels).astype(np.uint8), ids


def _val_stats(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels.astype(np.float32)))
    return float(loss), metrics.roc_auc(labels, 1 / (1 + np.exp(-logits)))


class ClassifierTask:
    section, log_name = "classifier", "fold"

    def __init__(self, config: dict):
        self.cfg, self.config = ClassifierConfig(**config[self.section]), config
        self.num_classes = int(config["num_classes"])
        self.channels = int(config.get("channels", 1))

    def create_model(self):
        c = self.cfg
        return create_classifier(c.encoder, self.num_classes, c.hidden, c.dropout, c.pretrained, c.output_stride, c.pool,
                                 in_chans=self.channels)

    def param_groups(self, core) -> list[dict]:
        return param_groups(core, self.cfg)

    @staticmethod
    def lr_fields(lrs: list[float]) -> dict:
        return {"lr_encoder": lrs[0], "lr_head": lrs[1]}

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.cfg.size)

    def decode(self, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Manifest rows -> (images ``uint8[N, h, w(, 3)]`` at ``size``, labels ``float32[N, C]``)."""
        return decode.classifier_rows(rows, self.config)

    @staticmethod
    def observe(targets) -> None:
        pass

    @staticmethod
    def load_note() -> str:
        return ""

    @staticmethod
    def augment(augment, imgs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if augment is None:
            return imgs, labels
        return np.stack([augment(image=im)["image"] for im in imgs]), labels

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, y)

    def validate(self, core, source, device, amp) -> training.Validation:
        logits, _, labels, _ = _predict_val(core, source, device, amp)
        loss, auc = _val_stats(logits, labels)
        text = "/".join("  nan" if np.isnan(a) else f"{a:.3f}" for a in auc)
        mean = np.nanmean(auc) if np.isfinite(auc).any() else float("nan")
        return training.Validation(loss, {"auc": [float(a) for a in auc]}, f" auc {text} (mean {mean:.3f})")

    def finish(self, core, keeper, source, device, amp, say) -> training.Finish:
        """Both BatchNorm variants of the averaged weights on the held-out fold; ``core`` is left
        with the chosen one."""
        cfg = self.cfg
        logits, probs, labels, ids = _predict_val(core, source, device, amp)
        variants = {"averaged_bn": _val_stats(logits, labels)}
        averaged = {k: v.clone() for k, v in core.state_dict().items()}
        training.update_bn(core, source.train_images(), device)
        logits_bn, probs_bn, labels_bn, ids_bn = _predict_val(core, source, device, amp)
        variants["recomputed_bn"] = _val_stats(logits_bn, labels_bn)
        if cfg.swa_update_bn:
            probs, ids = probs_bn, ids_bn  # a stream's rows may come in another order each pass
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
            {OOF_FILE: {"image_ids": ids, "probs": probs.tolist()}})
