"""The one fold training loop both stages run, and what it is made of.

:func:`train_loop_per_worker` is Ray Train's worker function for any fold of either stage: seeding,
mixed precision, DDP, resume (:class:`FoldState`), epochs with seeded batch order and augmentation,
the learning rate halved on a validation plateau, the top-k keeper, a checkpoint per epoch, the
weight average at the end and a final checkpoint. What differs between stages (model, targets,
loss, validation metrics, what the final checkpoint carries) comes from a task object
(:mod:`cam2seg.train.tasks`). The loop config names the task, the fold and the run's manifest
(:mod:`cam2seg.train.manifest`); nothing in it is per image.

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
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import io, logs, preprocess
from . import state, swa
from .memory import MemoryPeaks

__all__ = ["fold_say", "FINAL_FILE", "autocast", "save_checkpoint", "restore", "update_bn", "make_scaler", "FoldState",
           "train_loop_per_worker", "SWA_FILE", "RUN_FIELDS", "Validation", "Finish", "make_optimizer", "make_scheduler"]

SWA_FILE = "swa.safetensors"

FINAL_FILE = "final.json"
#: the fields of a fold's ``final.json`` that say how it ran (not what it learned), copied into the cards
RUN_FIELDS = ("ingest", "rows", "peak_rss_mib", "peak_private_mib", "peak_shared_mib", "peak_file_mib")
STATE_FILE = "state.json"

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
    with open(os.path.join(d, STATE_FILE), "w") as f:
        json.dump(meta, f)
    if final is not None:
        with open(os.path.join(d, FINAL_FILE), "w") as f:
            json.dump(final, f)


def restore(d: str, core, opt, sched, keeper: swa.TopK) -> tuple[int, list]:
    """Load a checkpoint folder into the given objects; returns (next epoch, history). Every
    file is read before any object changes, so a checkpoint that fails to load leaves them as
    they were."""
    with open(os.path.join(d, STATE_FILE)) as f:
        meta = json.load(f)
    weights = state.load_tensors(os.path.join(d, "model.safetensors"))
    opt_tensors = state.load_tensors(os.path.join(d, "optimizer.safetensors"))
    top = [(loss, ep, state.load_tensors(os.path.join(d, f"top-{i}.safetensors"))) for i, (loss, ep) in enumerate(meta["top"])]
    core.load_state_dict(weights)
    state.optimizer_from_flat(opt, opt_tensors, meta["optimizer"])
    sched.load_state_dict(meta["scheduler"])
    keeper.entries = top
    return meta["epoch"] + 1, meta["history"]


@torch.no_grad()
def update_bn(model, batches, device, mean=None, std=None) -> None:
    """Recompute BatchNorm running statistics of averaged weights over ``batches`` (an iterable
    of ``uint8[B, H, W(, 3)]`` image batches, read once); ``mean``/``std`` None: the images' own
    channels' normalisation (:func:`cam2seg.preprocess.to_input`)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        for _ in batches:  # a streamed split is read to its end on every rank (see ingest.Streamed)
            pass
        return
    momenta = {}
    for bn in bns:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None  # cumulative average over all batches
    model.train()
    for images in batches:
        model(preprocess.to_input(images, mean, std, device=device))
    for bn in bns:
        bn.momentum = momenta[bn]


@dataclass
class Validation:
    """A task's validation of one epoch: the loss the plateau and the keeper follow, extra
    history fields (e.g. ``{"auc": [...]}``) and the text the epoch line gets after the loss."""

    loss: float
    metrics: dict = field(default_factory=dict)
    text: str = ""


@dataclass
class Finish:
    """What a task's last step adds to the final checkpoint: the averaged model's validation
    loss, extra ``final.json`` fields, and JSON files by name."""

    loss: float
    final: dict = field(default_factory=dict)
    jsons: dict = field(default_factory=dict)


def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """Adam over a task's parameter groups (each with its own ``lr``)."""
    return torch.optim.Adam(groups)


def make_scheduler(opt, cfg):
    """Multiply every learning rate by ``cfg.lr_factor`` once validation loss has not improved
    for ``cfg.plateau_epochs`` epochs. torch counts patience after the first bad epoch, hence the -1."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                      patience=cfg.plateau_epochs - 1)


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

    def resume(self, say, epochs: int, fallback: list[str] = ()) -> bool:
        """Restore from Ray Train's checkpoint, if there is one, else from the first checkpoint
        folder in ``fallback`` (URLs, newest first) that loads; False when the fold had finished.

        ``fallback`` holds the checkpoints Ray Train lost track of
        (:func:`cam2seg.train.fold_runner.orphaned_checkpoints`); none of them is a final one."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                if os.path.exists(os.path.join(d, FINAL_FILE)):
                    say("already finished (final checkpoint found)")
                    return False
                self.start, self.history = restore(d, self.core, self.opt, self.sched, self.keeper)
        else:
            for url in fallback:
                with tempfile.TemporaryDirectory() as d:
                    try:
                        for name in io.list_names(url):
                            with open(os.path.join(d, name), "wb") as f:
                                f.write(io.read_bytes(io.join(url, name)))
                        self.start, self.history = restore(d, self.core, self.opt, self.sched, self.keeper)
                        break
                    except (OSError, ValueError, KeyError, RuntimeError) as e:
                        say(f"warning: checkpoint {url} does not load ({e}); trying an older one")
            else:
                if fallback:
                    say("warning: no checkpoint of this fold loads; training it afresh")
                return True
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


def fold_source(task, config: dict, rank: int, world: int):
    """The fold's batches (:mod:`cam2seg.train.ingest`): streamed when the fold runner gave the
    run Ray Data datasets (``config["ingest"] == "stream"``), else decoded into memory."""
    from . import ingest

    cfg, fold = task.cfg, int(config["fold"])
    seed = cfg.seed * 1000 + fold
    if config.get("ingest") == "stream":
        rows = config["rows"]
        return ingest.Streamed((rows["train"] // world, rows["val"]), cfg.batch_size, seed, cfg.shuffle_rows)
    source = ingest.InMemory(task, config["manifest"], fold, int(config["folds"]), cfg.batch_size, seed, rank, world)
    task.observe(source.y_train)
    return source


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker function for one fold of either stage. ``config``: ``task`` (a name in
    :data:`cam2seg.train.tasks.TASKS`), the task's config section under that name (a dict),
    ``fold``, ``folds``, ``manifest`` (URL), and the task's own keys (see each task)."""
    import ray.train
    import ray.train.torch

    from . import data
    from .tasks import TASKS

    task = TASKS[config["task"]](config)
    cfg = task.cfg
    quiet_ray_reports()
    fold = int(config["fold"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed * 1000 + fold)
    amp = cfg.mixed_precision and device.type == "cuda"
    say = fold_say(f"[{task.log_name} {fold}]", rank)

    model = ray.train.torch.prepare_model(task.create_model())
    core = model.module if hasattr(model, "module") else model
    opt = make_optimizer(task.param_groups(core))
    fs = FoldState(core, opt, make_scheduler(opt, cfg), swa.TopK(cfg.swa_epochs), make_scaler(amp), rank)
    if not fs.resume(say, cfg.epochs, config.get("resume_from", ())):
        return
    start, history, sched, keeper = fs.start, fs.history, fs.sched, fs.keeper

    t_load = time.perf_counter()
    memory = MemoryPeaks()
    source = fold_source(task, config, rank, world)
    n_train, n_val = source.counts
    how = "streaming" if config.get("ingest") == "stream" else "loaded"
    say(f"{how} {n_train} training and {n_val} validation images at {task.size[0]}x{task.size[1]}"
        f"{'' if how == 'streaming' else f' in {time.perf_counter() - t_load:.1f}s'}{task.load_note()}; "
        f"device {device}, {world} worker(s)")
    augment = data.build_augment(cfg.augment, seed=cfg.seed * 1000 + fold + 7919 * start)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total, seen, waited, first_wait = 0.0, 0, 0.0, None
        batches = iter(source.train(epoch))
        while True:
            t_wait = time.perf_counter()
            # the time the step waits on the data pipeline: what the GPU rows of BENCHMARKS.md report
            batch = next(batches, None)
            waited += time.perf_counter() - t_wait
            if first_wait is None:
                # streamed, the pass's start-up (a new Ray Data execution), whatever its length
                first_wait = waited
            if batch is None:
                break
            memory.sample()
            imgs, tgts = batch
            if how == "streaming" and epoch == start:
                task.observe(tgts)  # what the in-memory source counted over the whole fold
            imgs, tgts = task.augment(augment, imgs, tgts)
            x = preprocess.to_input(imgs, device=device)
            y = torch.from_numpy(np.ascontiguousarray(tgts)).to(device)
            opt.zero_grad(set_to_none=True)
            with autocast(device, amp):
                logits = model(x)
            loss = task.loss(logits.float(), y)
            fs.step(loss)
            total += float(loss.detach()) * len(imgs)
            seen += len(imgs)
        train_loss = total / max(seen, 1)
        train_secs = time.perf_counter() - t0
        val = task.validate(core, source, device, amp)
        memory.sample()
        lrs = [g["lr"] for g in opt.param_groups]
        sched.step(val.loss)
        kept = keeper.offer(val.loss, epoch, core.state_dict())
        secs = time.perf_counter() - t0
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val.loss, **val.metrics,
                        **task.lr_fields(lrs), "seconds": secs, "train_seconds": train_secs, "data_wait_seconds": waited,
                        "first_batch_seconds": first_wait, "kept": kept, **memory.epoch_fields()})
        say(f"epoch {epoch + 1}/{cfg.epochs} train_loss {train_loss:.4f} val_loss {val.loss:.4f}{val.text} "
            f"lr {'/'.join(f'{lr:.1e}' for lr in lrs)} {secs:.1f}s {seen * world / secs:.1f} img/s "
            f"({waited:.1f}s waiting on data)")
        fs.report({"fold": fold, "epoch": epoch, "train_loss": train_loss, "val_loss": val.loss}, epoch)

    core.load_state_dict(keeper.average())
    end = task.finish(core, keeper, source, device, amp, say)
    final = {"fold": fold, "workers": world, "swa_epochs": keeper.epochs, "val_loss": end.loss, "history": history,
             "ingest": config.get("ingest", "memory"), "rows": config.get("rows"), **memory.fields(),
             **end.final}
    fs.report({"fold": fold, "epoch": cfg.epochs, "val_loss": end.loss, "final": True}, cfg.epochs - 1, final=final,
              tensors={SWA_FILE: core.state_dict()}, jsons=end.jsons)
