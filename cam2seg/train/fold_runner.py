"""K fold trainings side by side on Ray: each fold is its own Ray Train run.

Each fold is a ``TorchTrainer`` with its own workers, GPUs and ``FailureConfig``, driven by a
zero-CPU Ray task so the K runs proceed side by side on whatever cluster ``ray.init`` finds.
Ray 2.60 has no built-in cross-validation; Ray's own guide nests ``TorchTrainer`` runs in Tune
trials for this. Plain tasks do the same job with less machinery: no trial resources to
reserve (a Tune trial holds a CPU by default, which on a small machine starves the training
workers), and no experiment state of a second kind, because each fold's Train run already
keeps its own checkpoints in storage.

Re-running after a kill continues: a fold whose run finished is staged under
``<work>/done/fold-<k>/`` and skipped; a fold that was interrupted resumes from its last
epoch's checkpoint (same run name and storage path under ``<work>/runs``), also when the kill
cut Ray Train's own record of those checkpoints short (:func:`orphaned_checkpoints`). Callers
put a hash of what determines the weights into ``work``, so a changed config starts afresh.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import posixpath
import time
from typing import Callable

from .. import io, logs
from .loop import FINAL_FILE, STATE_FILE

__all__ = ["RUNTIME_ONLY", "run_folds", "fold_done", "done_url", "run_url", "fold_env_vars", "fit_folds",
           "trained_card", "drop_checkpoints", "config_digest", "fold_configs", "stage_checkpoint",
           "orphaned_checkpoints"]

_log = logging.getLogger(__name__)

# Settings that change how a run executes but not what it learns: they stay out of run keys.
RUNTIME_ONLY = {"load_threads", "keep_checkpoints", "max_failures", "workers_per_fold", "cpus_per_worker",
                "gpus_per_worker", "decoders", "decode_cpus", "stream_ahead_rows", "min_fold_auc"}

_POLL_S = 1.0    # how often the driver shows the workers' new lines
# Ray Train's controller polls its workers every 2 s by default, so it learns that a fold's loop
# has ended (or that a worker died) up to 2 s late, more than once per run. At 0.5 s a 2-fold run
# that trains nothing took 15 s instead of 18 s on 2 cores (BENCHMARKS.md, "Test suite time"), for a
# few small calls a second per fold. A value exported by the user wins; Ray Train passes it on
# from the fold task to its controller.
_HEALTH_CHECK_VAR, _HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
_NOTE_S = 60.0   # a "still training" line after this long without news of a fold
_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's run state, in each run folder (Ray 2.60)


def run_url(work: str, fold: int) -> str:
    """Fold ``fold``'s Ray Train run folder (its checkpoints and Ray Train's run state)."""
    return io.join(work, "runs", f"fold-{fold}")


def done_url(work: str, fold: int) -> str:
    return io.join(work, "done", f"fold-{fold}")


def fold_done(work: str, fold: int) -> bool:
    return io.exists(io.join(done_url(work, fold), FINAL_FILE))


_LOOP_KEY = "_cam2seg_loop"


def _run_loop(config: dict) -> None:
    """The ``train_loop_per_worker`` every fold's Ray Train run gets: it imports the real loop
    (``config[_LOOP_KEY]``, "module:function") in the training worker only. The fold task,
    which holds the function but never runs it, then imports none of timm, torchvision or smp:
    190 MB less per fold on the driver's node (measured: 882 -> 696 MB resident)."""
    module, name = config[_LOOP_KEY].split(":")
    loop = getattr(importlib.import_module(module), name)
    loop({k: v for k, v in config.items() if k != _LOOP_KEY})


def fold_env_vars(gcs_address: str) -> dict[str, str]:
    """The environment every fold task (and through it, its Train controller) runs with: this
    cluster's address and the health-check interval (the user's, when exported)."""
    return {"RAY_ADDRESS": gcs_address, _HEALTH_CHECK_VAR: os.environ.get(_HEALTH_CHECK_VAR, _HEALTH_CHECK_S)}


def _fold_task(fold: int, loop: Callable, loop_config: dict, work: str, workers: int, cpus: float, gpus: float,
               max_failures: int, staged: tuple[str, ...]) -> dict:
    """Train one fold with Ray Train; stage its final checkpoint to ``done_url(work, fold)``
    (:func:`stage_checkpoint`)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .ingest import data_config, fold_datasets

    datasets = {}
    if loop_config.get("ingest") == "stream":
        c = loop_config[loop_config["task"]]
        datasets = fold_datasets(loop_config, cpus=c["decode_cpus"], decoders=c["decoders"], batch_rows=c["batch_size"],
                                 seed=c["seed"] * 1000 + fold)

    storage_path, storage_fs = io.arrow_filesystem(io.join(work, "runs"))  # the run folder: run_url(work, fold)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets, dataset_config=data_config(loop_config.get("stream_ahead_bytes")),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=RunConfig(
            name=f"fold-{fold}", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's INFO lines (one per checkpoint) drown the epoch lines.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fold {fold}: training ended without a checkpoint")
    stage_checkpoint(io.join(run_url(work, fold), posixpath.basename(result.checkpoint.path.rstrip("/"))),
                     done_url(work, fold), staged)
    return {"fold": fold, "checkpoint": result.checkpoint.path}


def stage_checkpoint(checkpoint: str, done: str, staged: tuple[str, ...]) -> None:
    """Copy a fold's final checkpoint folder's files named in ``staged`` (or starting with
    ``top-``) to ``done``, the final marker last, so a half-staged fold counts as not done."""
    names = io.list_names(checkpoint)
    if FINAL_FILE not in names:
        raise RuntimeError(f"the last checkpoint is not a final one: {checkpoint}")
    for name in sorted(names, key=lambda n: n == FINAL_FILE):
        if name in staged or name == FINAL_FILE or name.startswith("top-"):
            io.write_bytes(io.join(done, name), io.read_bytes(io.join(checkpoint, name)))


def orphaned_checkpoints(work: str, fold: int) -> list[str]:
    """The URLs of fold ``fold``'s checkpoint folders (newest first, each with a readable state
    file) when Ray Train would not resume from them itself; [] when it would, or when there are none.

    Ray Train finds a run's checkpoints through its run state file (``_SNAPSHOT``), which it
    writes after each checkpoint, in place: a command killed at that moment leaves it empty or
    cut short, and Ray Train then refuses to start the run at all (a JSONDecodeError, on every
    later try). Killed a moment earlier, the checkpoint folder is there without the state file.
    An unreadable state file is moved aside (nothing is deleted), so Ray Train starts the run
    afresh and the training loop resumes from these folders (``resume_from`` in its config)."""
    run = run_url(work, fold)
    names = io.list_names(run)
    if _SNAPSHOT in names:
        fs, path = io.filesystem(io.join(run, _SNAPSHOT), fresh=True)
        try:
            json.loads(fs.cat_file(path))
            return []
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
            aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            fs.mv(path, aside)
            _log.warning(f"warning: fold {fold}: Ray Train's run state {io.join(run, _SNAPSHOT)} is unreadable ({e}), "
                         f"probably cut short by a kill; moved it aside to {aside} and resuming from the newest "
                         "readable checkpoint instead")
    found = []
    # Ray Train names checkpoint folders by time ("checkpoint_2026-12-02_03-00-00.000001"): newest last.
    for name in reversed([n for n in names if n.startswith("checkpoint_") and not n.startswith(_SNAPSHOT)]):
        try:
            json.loads(io.read_bytes(io.join(run, name, STATE_FILE)))
        except (OSError, ValueError):
            continue
        found.append(io.join(run, name))
    return found


def run_folds(loop: Callable, configs: dict[int, dict], work: str, *, workers: int, cpus: float, gpus: float,
              max_failures: int, staged: tuple[str, ...], t0: float | None = None) -> None:
    """Run ``loop`` (a ``train_loop_per_worker``) once per fold in ``configs`` (fold -> loop
    config), concurrently; a failing fold cancels the others and raises.

    The training workers' ``cam2seg`` log records (epoch lines) come back through a log sink
    (:class:`cam2seg.logs.LogRelay`) that this loop reads every second, so they show on the
    driver as its own lines, whatever Ray does with worker output."""
    import ray

    t0 = time.perf_counter() if t0 is None else t0
    relay = logs.LogRelay()
    # Ray Train's helpers in the workers (its placement-group cleaner's State API calls) look
    # for "the" local cluster by listing gcs_server processes when RAY_ADDRESS is unset, and
    # fail when two commands each run a local Ray. Tell the folds' process tree which one is
    # theirs: runtime_env env_vars are inherited by the Train controller and its actors.
    env = {"env_vars": fold_env_vars(ray.get_runtime_context().gcs_address)}
    task = ray.remote(num_cpus=0, max_retries=0)(_fold_task)
    name = f"{loop.__module__}:{loop.__qualname__}"
    try:
        pending = {task.options(name=f"cam2seg-fold-{k}", runtime_env=env).remote(
                       k, _run_loop, {**cfg, _LOOP_KEY: name}, work, workers, cpus, gpus, max_failures, staged): k
                   for k, cfg in configs.items()}
        last_note = time.perf_counter()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
            if ready:
                relay.flush()  # a finished fold's last lines come before its "done"
            else:
                relay.poll()
            for ref in ready:
                k = pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:
                    for other in pending:
                        ray.cancel(other)
                    raise RuntimeError(f"fold {k} failed: {e}") from e
                _log.info(f"fold {k}: done ({time.perf_counter() - t0:.0f}s since start, {len(pending)} fold(s) still running)")
                last_note = time.perf_counter()
            if pending and time.perf_counter() - last_note >= _NOTE_S:
                _log.info(f"... {len(pending)} fold(s) still training ({time.perf_counter() - t0:.0f}s)")
                last_note = time.perf_counter()
    finally:
        relay.close()


def config_digest(cfg) -> str:
    """A hash of a stage's config without the settings in :data:`RUNTIME_ONLY` (for run keys)."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json", exclude=RUNTIME_ONLY), sort_keys=True).encode()
                          ).hexdigest()


def trained_card(out: str, key: str, force: bool):
    """The card at ``out`` when it was trained by run ``key`` (nothing to do), else None."""
    from ..artifact import ArtifactError, load_card

    if force or not io.exists(io.join(out, "model.json")):
        return None
    try:
        card = load_card(out)
    except ArtifactError as e:
        _log.warning(f"warning: {e}; training afresh and writing over it")
        return None
    if card.training.run_key != key:
        return None
    _log.info(f"{out} already holds this {card.kind} (run {key}, version {card.version}); use --force to retrain")
    return card


def fold_configs(task: str, cfg, manifest_url: str, k_folds: int, folds: list[int], extra: dict) -> dict[int, dict]:
    """Fold -> loop config for :func:`cam2seg.train.loop.train_loop_per_worker`: the task, its
    config section, the fold and the manifest's URL, and ``extra``; nothing per image, so its
    size does not grow with the archive."""
    return {k: {"task": task, task: cfg.model_dump(mode="json"), "fold": k, "folds": k_folds,
                "manifest": manifest_url, **extra} for k in folds}


def fit_folds(task: str, cfg, table, work: str, k_folds: int, *, extra: dict, staged: tuple[str, ...], what: str,
              t0: float | None = None, fill=None) -> None:
    """Train the folds of ``work`` (``<out>/_train/<run key>``) that are not done yet, side by side.

    ``task``: a name in :data:`cam2seg.train.tasks.TASKS`, whose section ``cfg`` is; ``table``: the
    run's manifest (:func:`cam2seg.train.manifest.manifest_table`), written once under
    ``<work>/manifest`` and read by the workers (``fill``: the columns ``table`` leaves out, added
    fold by fold, as :func:`cam2seg.train.manifest.write_manifest` takes it); ``extra``: the task's
    loop config keys; ``what``: the start of the log line saying what trains."""
    from ..raycluster import ensure_ray, gpus_or_auto
    from . import manifest
    from .loop import train_loop_per_worker

    ensure_ray()
    gpus = gpus_or_auto(cfg.gpus_per_worker, _log.warning)
    url = manifest.write_manifest(io.join(work, "manifest"), table, fill)
    todo, orphans = [], {}
    for k in range(k_folds):
        if not fold_done(work, k) and (found := orphaned_checkpoints(work, k)):
            if FINAL_FILE in io.list_names(found[0]):
                stage_checkpoint(found[0], done_url(work, k), staged)  # it had finished, then the kill came
            else:
                orphans[k] = found
        if fold_done(work, k):
            _log.info(f"fold {k}: finished in an earlier run, reusing it")
        else:
            todo.append(k)
    configs = fold_configs(task, cfg, url, k_folds, todo, extra)
    for k, found in orphans.items():
        configs[k]["resume_from"] = found
    mode = _ingest(cfg, table, configs)
    _log.info(f"training {len(configs)} of {k_folds} {what}: {table.num_rows} images, {cfg.epochs} epochs, "
              f"{cfg.workers_per_fold} worker(s) per fold, {gpus:g} GPU(s) per worker, images {mode}; "
              f"checkpoints under {work}/runs")
    run_folds(train_loop_per_worker, configs, work, workers=cfg.workers_per_fold, cpus=cfg.cpus_per_worker, gpus=gpus,
              max_failures=cfg.max_failures, staged=staged, t0=t0)


def _ingest(cfg, table, configs: dict[int, dict]) -> str:
    """Resolve ``cfg.ingest`` for this run's size and put it, with each fold's row counts, into
    the loop configs; "in memory" or "streamed by Ray Data" for the log line. Streaming needs
    CPUs beside the training workers' for its read and decode tasks: raises ValueError
    when the cluster has too few (Ray Data would wait for them forever)."""
    from ..raycluster import cluster_cpus
    from . import manifest
    from .ingest import decoded_bytes, ingest_mode

    if not configs:  # every fold finished earlier: nothing reads images
        return "in memory"
    folds = table.column("fold").to_numpy()
    size = tuple(next(iter(configs.values())).get("size", cfg.size))
    # a segmenter's manifest (with or without its mask strings yet) has the masks' height
    channels = len(table.column("labels")[0]) if "height" in table.column_names and table.num_rows else 0
    largest = max((manifest.training_count(table, folds != k) for k in configs), default=0)
    image_channels = int(next(iter(configs.values())).get("channels", 1))
    mode = ingest_mode(cfg.ingest, largest, size, channels, cfg.max_memory_gb, image_channels)
    for k, c in configs.items():
        c["ingest"] = mode
        c["rows"] = {"train": manifest.training_count(table, folds != k), "val": int((folds == k).sum())}
        if mode == "stream":
            c["stream_ahead_bytes"] = decoded_bytes(cfg.stream_ahead_rows, size, channels, image_channels)
    if mode != "stream":
        return "in memory"
    workers = len(configs) * cfg.workers_per_fold
    # per fold: the training split's reads and decoders, and each worker's own pass over "val"
    need = workers * cfg.cpus_per_worker + len(configs) * (cfg.workers_per_fold + 2) * cfg.decoders * cfg.decode_cpus
    have = cluster_cpus()
    if need > have + 1e-9:
        raise ValueError(
            f"streaming {len(configs)} fold(s) needs about {need:g} CPUs ({workers} training worker(s) at "
            f"{cfg.cpus_per_worker:g}, plus Ray Data's decoders at {cfg.decode_cpus:g} each) and the cluster has "
            f"{have:g}: lower cpus_per_worker, decoders or decode_cpus, or use ingest: memory")
    return "streamed by Ray Data"


def drop_checkpoints(out: str, cfg) -> None:
    """Remove ``<out>/_train`` (checkpoints, staged folds, manifest) unless ``cfg.keep_checkpoints``."""
    if not cfg.keep_checkpoints:
        fs, path = io.filesystem(io.join(out, "_train"))
        fs.rm(path, recursive=True)
