"""Connecting to Ray the same way from every job: the cluster in RAY_ADDRESS (``ray job
submit`` sets it) or a local one, with the log settings that keep the driver readable."""

from __future__ import annotations

import os

__all__ = ["ensure_ray", "cluster_gpus"]


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
