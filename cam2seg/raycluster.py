"""Connecting to Ray the same way from every job: the cluster in RAY_ADDRESS (``ray job
submit`` sets it) or a local one, with the log settings that keep the driver readable."""

from __future__ import annotations

import os

__all__ = ["ensure_ray", "cluster_gpus", "gpus_or_auto"]


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one; quiet about it."""
    import ray

    if not ray.is_initialized():
        # Train V2 re-routes worker print() through its logger as well as stdout, which shows
        # every line twice on the driver; its per-checkpoint INFO lines drown the epoch lines.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        # Ray merges "similar" lines across workers: fold 0's epoch line would vanish into fold 1's.
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=True,
                 logging_config=ray.LoggingConfig(log_level="WARNING"))


def cluster_gpus() -> float:
    """GPUs the connected cluster has (0 on a CPU-only one)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


_warned = False


def gpus_or_auto(explicit: float | None, log=None) -> float:
    """The configured GPUs per worker or actor, or (``None``) 1 when the cluster has GPUs now
    and 0 otherwise. "Now" is the catch on an autoscaling cluster: GPU workers scaled to zero
    are invisible, so say so instead of quietly running on CPUs."""
    if explicit is not None:
        return explicit
    if cluster_gpus() >= 1:
        return 1.0
    global _warned
    if log is not None and not _warned:
        _warned = True
        log("no GPU in the cluster now: running on CPUs. If GPU workers autoscale from zero, set "
            "gpus_per_worker / gpus_per_actor: 1 in the config (cluster/cam2seg.yaml does) so the jobs ask for them")
    return 0.0
