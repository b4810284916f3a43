"""Stage 1 on one fold: Ray Train's ``train_loop_per_worker`` for the paper's classifier.

Per epoch: BCE over images x classes, Adam (encoder and head learning rates), validation
loss and per-class ROC-AUC, the learning rate halved after ``plateau_epochs`` without
improvement, the weights offered to the top-k keeper, a checkpoint (safetensors + JSON) and
a log line. After the last epoch the k best epochs are averaged (SWA), the averaged model
predicts the fold's held-out images (its out-of-fold probabilities) and a final checkpoint
carries both. A worker restarted from a checkpoint continues at the next epoch; one
restarted from the final checkpoint has nothing left to do.

With ``ScalingConfig(num_workers=0)`` Ray Train runs this same function in the calling
process, which is how it runs without a cluster.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .. import preprocess, metrics
from . import swa, loop as training
from ..models.classifier import create_classifier
from ..config import ClassifierConfig
from .loop import FINAL_FILE

__all__ = ["train_fold_loop", "make_optimizer", "make_scheduler", "predict", "FINAL_FILE", "SWA_FILE", "OOF_FILE"]

SWA_FILE = "swa.safetensors"
OOF_FILE = "oof.json"


def make_optimizer(core, cfg: ClassifierConfig) -> torch.optim.Optimizer:
    """Adam with the paper's two learning rates: encoder and head."""
    return torch.optim.Adam([
        {"params": core.encoder.parameters(), "lr": cfg.lr_encoder},
        {"params": core.head.parameters(), "lr": cfg.lr_head},
    ])


def make_scheduler(opt, cfg: ClassifierConfig):
    """Multiply every learning rate by ``lr_factor`` once validation loss has not improved for
    ``plateau_epochs`` epochs. torch counts patience after the first bad epoch, hence the -1."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.lr_factor, patience=cfg.plateau_epochs - 1
    )


@torch.no_grad()
def predict(model, images: np.ndarray, batch_size: int, device, amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``float32[N, C]`` of an eval-mode model over ``uint8[N, H, W]`` images."""
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


def train_fold_loop(config: dict) -> None:
    """Ray Train worker function. ``config``: ``classifier`` (ClassifierConfig as a dict),
    ``fold``, ``train_urls``/``val_urls`` (image URLs), ``train_labels``/``val_labels``
    (0/1 lists ``[N, C]``), ``val_ids``."""
    import ray.train
    import ray.train.torch

    cfg = ClassifierConfig(**config["classifier"])
    training.quiet_ray_reports()
    fold = int(config["fold"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed * 1000 + fold)
    amp = cfg.mixed_precision and device.type == "cuda"
    say = training.fold_say(f"[fold {fold}]", rank)

    model = create_classifier(cfg.encoder, len(config["train_labels"][0]), cfg.hidden, cfg.dropout, cfg.pretrained,
                              cfg.output_stride, cfg.pool)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    opt = make_optimizer(core, cfg)
    fs = training.FoldState(core, opt, make_scheduler(opt, cfg), swa.TopK(cfg.swa_epochs), training.make_scaler(amp),
                            rank)
    if not fs.resume(say, cfg.epochs):
        return
    start, history, sched, keeper = fs.start, fs.history, fs.sched, fs.keeper

    t_load = time.perf_counter()
    x_train = preprocess.load_images(config["train_urls"], cfg.size, cfg.load_threads)
    x_val = preprocess.load_images(config["val_urls"], cfg.size, cfg.load_threads)
    y_train = np.asarray(config["train_labels"], dtype=np.float32)
    y_val = np.asarray(config["val_labels"], dtype=np.uint8)
    say(f"loaded {len(x_train)} training and {len(x_val)} validation images at {cfg.size[0]}x{cfg.size[1]} "
        f"in {time.perf_counter() - t_load:.1f}s; device {device}, {world} worker(s)")
    augment = data.build_augment(cfg.augment, seed=cfg.seed * 1000 + fold + 7919 * start)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total, seen = 0.0, 0
        for idx in data.epoch_batches(len(x_train), cfg.batch_size, epoch, cfg.seed * 1000 + fold, rank, world):
            imgs = x_train[idx]
            if augment is not None:
                imgs = np.stack([augment(image=im)["image"] for im in imgs])
            x = preprocess.to_input(imgs, device=device)
            y = torch.from_numpy(y_train[idx]).to(device)
            opt.zero_grad(set_to_none=True)
            with training.autocast(device, amp):
                loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
            fs.step(loss)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        train_loss = total / max(seen, 1)
        logits, _ = predict(core, x_val, cfg.batch_size, device, amp)
        val_loss, auc = _val_stats(logits, y_val)
        lrs = [g["lr"] for g in opt.param_groups]
        sched.step(val_loss)
        kept = keeper.offer(val_loss, epoch, core.state_dict())
        secs = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "auc": [float(a) for a in auc],
               "lr_encoder": lrs[0], "lr_head": lrs[1], "seconds": secs, "kept": kept}
        history.append(row)
        auc_text = "/".join("  nan" if np.isnan(a) else f"{a:.3f}" for a in auc)
        say(f"epoch {epoch + 1}/{cfg.epochs} train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
            f"auc {auc_text} (mean {np.nanmean(auc) if np.isfinite(auc).any() else float('nan'):.3f}) "
            f"lr {lrs[0]:.1e}/{lrs[1]:.1e} {secs:.1f}s {seen * world / secs:.1f} img/s")
        fs.report({"fold": fold, "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}, epoch)

    # SWA: the average of the best epochs by validation loss. Both BatchNorm variants are
    # scored on the held-out fold, so the choice of swa_update_bn rests on numbers.
    core.load_state_dict(keeper.average())
    logits, probs = predict(core, x_val, cfg.batch_size, device, amp)
    variants = {"averaged_bn": _val_stats(logits, y_val)}
    averaged = {k: v.clone() for k, v in core.state_dict().items()}
    training.update_bn(core, x_train, cfg.batch_size, device)
    logits_bn, probs_bn = predict(core, x_val, cfg.batch_size, device, amp)
    variants["recomputed_bn"] = _val_stats(logits_bn, y_val)
    if cfg.swa_update_bn:
        probs = probs_bn
    else:
        core.load_state_dict(averaged)
    val_loss, auc = variants["recomputed_bn" if cfg.swa_update_bn else "averaged_bn"]
    for name, (loss_v, auc_v) in variants.items():
        say(f"SWA over epochs {[e + 1 for e in keeper.epochs]}, {name}: val_loss {loss_v:.4f} "
            f"auc {'/'.join(f'{a:.3f}' for a in auc_v)} (mean {np.nanmean(auc_v):.3f})")
    final = {"fold": fold, "workers": world, "swa_epochs": keeper.epochs, "val_loss": val_loss, "auc": [float(a) for a in auc],
             "history": history, "swa_bn_variants": {k: {"val_loss": lv, "auc": [float(a) for a in av]}
                                                     for k, (lv, av) in variants.items()}}
    fs.report({"fold": fold, "epoch": cfg.epochs, "val_loss": val_loss, "final": True}, cfg.epochs - 1, final=final,
              tensors={SWA_FILE: core.state_dict()},
              jsons={OOF_FILE: {"image_ids": config["val_ids"], "probs": probs.tolist()}})
