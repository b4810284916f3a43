"""What every fold training loop shares: mixed precision, checkpoints, BatchNorm refresh.

A checkpoint is a folder of safetensors files (model, optimizer tensors, the top-k weight
snapshots) and one JSON file (epoch, history, optimizer and scheduler scalars), so resuming
never unpickles anything. The final checkpoint of a fold also holds ``final.json``; a worker
restarted from it has nothing left to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import logs, preprocess
from . import state, swa

__all__ = ["fold_say", "FINAL_FILE", "autocast", "save_checkpoint", "restore", "update_bn", "make_scaler", "FoldState"]

FINAL_FILE = "final.json"
_STATE_FILE = "state.json"

_log = logging.getLogger(__name__)


def fold_say(prefix: str, rank: int):
    """Rank 0's progress line writer for one fold (``"[fold 1] epoch 3/30 ..."``); the other
    DDP ranks stay quiet, since they would repeat rank 0's line."""
    logs.configure()
    if rank:
        return lambda msg: None
    return lambda msg: _log.info("%s %s", prefix, msg)


def quiet_ray_reports() -> None:
    """Ray Train V2 logs every ``ray.train.report`` at INFO on the worker, one long line per
    epoch next to our own epoch line; keep its warnings, drop that chatter."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def autocast(device: torch.device, enabled: bool):
    """bf16 (or fp16 where bf16 is missing) autocast on CUDA; nothing elsewhere."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def save_checkpoint(d: str, core, opt, sched, keeper: swa.TopK, history: list, epoch: int, final=None) -> None:
    """Write the training state after ``epoch`` into the folder ``d`` (``final``: the fold's summary)."""
    state.save_tensors(os.path.join(d, "model.safetensors"), core.state_dict())
    opt_tensors, opt_meta = state.optimizer_to_flat(opt)
    state.save_tensors(os.path.join(d, "optimizer.safetensors"), opt_tensors)
    for i, (_, _, snap) in enumerate(keeper.entries):
        state.save_tensors(os.path.join(d, f"top-{i}.safetensors"), snap)
    meta = {
        "epoch": epoch,
        "pid": os.getpid(),  # which worker process wrote it (operators and fault tests use it)
        "history": history,
        "optimizer": opt_meta,
        "scheduler": {k: v for k, v in sched.state_dict().items() if k != "_last_lr"},
        "top": [(loss, ep) for loss, ep, _ in keeper.entries],
    }
    with open(os.path.join(d, _STATE_FILE), "w") as f:
        json.dump(meta, f)
    if final is not None:
        with open(os.path.join(d, FINAL_FILE), "w") as f:
            json.dump(final, f)


def restore(d: str, core, opt, sched, keeper: swa.TopK) -> tuple[int, list]:
    """Load a checkpoint folder into the given objects; returns (next epoch, history)."""
    with open(os.path.join(d, _STATE_FILE)) as f:
        meta = json.load(f)
    core.load_state_dict(state.load_tensors(os.path.join(d, "model.safetensors")))
    state.optimizer_from_flat(opt, state.load_tensors(os.path.join(d, "optimizer.safetensors")), meta["optimizer"])
    sched.load_state_dict(meta["scheduler"])
    keeper.entries = [
        (loss, ep, state.load_tensors(os.path.join(d, f"top-{i}.safetensors"))) for i, (loss, ep) in enumerate(meta["top"])
    ]
    return meta["epoch"] + 1, meta["history"]


@torch.no_grad()
def update_bn(model, images: np.ndarray, batch_size: int, device, mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD) -> None:
    """Recompute BatchNorm running statistics of averaged weights over ``uint8[N, H, W]`` images."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = {}
    for bn in bns:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None  # cumulative average over all batches
    model.train()
    for i in range(0, len(images), batch_size):
        model(preprocess.to_input(images[i : i + batch_size], mean, std, device=device))
    for bn in bns:
        bn.momentum = momenta[bn]


def make_scaler(amp: bool):
    """A gradient scaler for fp16 autocast (bf16 needs none); None without mixed precision."""
    return torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported()) if amp else None


@dataclass
class FoldState:
    """What a fold's ``train_loop_per_worker`` carries from epoch to epoch, and the three things
    both loops do with it: resume from Ray Train's checkpoint, take an optimiser step, report."""

    core: torch.nn.Module  # the unwrapped model (DDP's ``.module``)
    opt: torch.optim.Optimizer
    sched: object
    keeper: swa.TopK
    scaler: object = None
    rank: int = 0
    start: int = 0
    history: list = field(default_factory=list)

    def resume(self, say, epochs: int) -> bool:
        """Restore from Ray Train's checkpoint, if there is one; False when the fold had finished."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return True
        with ckpt.as_directory() as d:
            if os.path.exists(os.path.join(d, FINAL_FILE)):
                say("already finished (final checkpoint found)")
                return False
            self.start, self.history = restore(d, self.core, self.opt, self.sched, self.keeper)
        say(f"resuming at epoch {self.start + 1}/{epochs} from a checkpoint")
        self.history.append({"event": "resumed", "epoch": self.start})
        return True

    def step(self, loss: torch.Tensor) -> None:
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    def report(self, metrics: dict, epoch: int, final: dict | None = None, tensors: dict | None = None,
               jsons: dict | None = None) -> None:
        """``ray.train.report`` with a checkpoint from rank 0 (plus ``tensors`` / ``jsons`` files
        by name, and ``final`` for the last one); other ranks report metrics only."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            for name, t in (tensors or {}).items():
                state.save_tensors(os.path.join(d, name), t)
            for name, obj in (jsons or {}).items():
                with open(os.path.join(d, name), "w") as f:
                    json.dump(obj, f)
            save_checkpoint(d, self.core, self.opt, self.sched, self.keeper, self.history, epoch, final=final)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
