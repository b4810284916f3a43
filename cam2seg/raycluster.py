"""Connecting to Ray the same way from every job: the cluster in RAY_ADDRESS (``ray job
submit`` sets it), else what ``ray.init()`` finds (a head started with ``ray start``) or a local
Ray of this command's own.

The terminal shows cam2seg's lines only. Ray's own output stays in Ray's log files under the
session folder (``<session>/logs``):

* workers: ``log_to_driver=False``, so their stdout/stderr stay in ``worker-*.out|err`` (Ray
  Train's placement-group cleaner, the core workers' C++ warnings, ...). cam2seg's records from
  training workers reach the driver through :mod:`cam2seg.logs`' log sink instead.
* the driver's Python loggers ``ray`` and ``ray.data``: their console handlers are replaced by
  ``<session>/logs/cam2seg-driver-<pid>.log`` (``ray.data`` keeps its own ``ray-data/`` files),
  including what ``ray.init`` itself logs. Ray Data's progress bars on a terminal are not log
  records and still show.
* the raylet's "N worker processes have been started" warning, which the driver's error
  listener prints on stdout, goes to that file too; other messages Ray pushes to the driver
  (a worker that died, a node that was lost) still print.

Security of the local Ray a command starts (none is found, no RAY_ADDRESS):

* it listens on loopback only: its node IP is 127.0.0.1, so the GCS, the raylet, the core
  workers' gRPC servers, the dashboard and runtime-env agents and the metrics servers bind
  127.0.0.1 (``ray.init`` turns ``_node_ip_address="127.0.0.1"`` into the LAN address through
  ``ray._private.services.resolve_ip_for_localhost``; that call is bypassed for 127.0.0.1
  while ``ray.init`` runs).
* it keeps Ray's token authentication on: RAY_AUTH_MODE unset means ``token`` (Ray creates
  ``~/.ray/auth_token`` when there is none). ``RAY_AUTH_MODE=disabled`` (or any other mode) is
  refused with :class:`UnauthenticatedRayError` unless ``CAM2SEG_ALLOW_UNAUTHENTICATED_RAY=1``.

* it does not outlive the command: :mod:`cam2seg.reaper` kills what is left of it when the
  driver ends in any way (Ray's agents otherwise stay a minute after a SIGKILL).

Lean on a small machine (the local Ray a command starts; a laptop's cores are the training's):

* no Ray Train preemption watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``, unless set): it
  polls the GCS for nodes about to be preempted, and this cluster's one node is the driver's own
  machine. Each fold's worker group otherwise starts one more process for it.
* no extra idle workers when the driver connects (``prestart_worker_first_driver``): the raylet
  still prestarts one per CPU at startup. On 2 cores the driver's extra pair is never used by a
  training command (Ray Train's actors run under their own runtime env) and costs ~1.7 CPU-s.
* idle workers are kept for reuse (``num_workers_soft_limit``: at least 8, twice the CPUs on
  larger machines). Ray's default keeps as many as there are *unallocated* CPUs, which training
  workers holding the CPUs bring to zero: each Ray Data pass of a streamed fold then started
  its read and decode workers afresh. On 2 cores that cut an epoch's start-up from 14.7 s to
  4.3 s (BENCHMARKS.md "Start-up per pass").

A cluster cam2seg joins (RAY_ADDRESS, or a head ``ray start`` left for ``ray.init()`` to find)
is its operator's: nothing is checked or changed there.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
from contextlib import contextmanager

__all__ = ["ensure_ray", "lean_local", "cluster_gpus", "gpus_or_auto", "UnauthenticatedRayError", "ALLOW_UNAUTHENTICATED_ENV"]

AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's: ray._private.authentication.authentication_token_setup
ALLOW_UNAUTHENTICATED_ENV = "CAM2SEG_ALLOW_UNAUTHENTICATED_RAY"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray's: ray.train.v2._internal.constants
LOOPBACK = "127.0.0.1"

_FILE_HANDLER = "cam2seg-ray-file"
_RAY_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"  # Ray's own
_POOL_WARNING = re.compile(r"^WARNING: \d+ \w+ worker processes have been started on node")


class UnauthenticatedRayError(ValueError):
    """A local Ray cluster would start without authentication (RAY_AUTH_MODE=disabled)."""


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one on loopback with token
    authentication; quiet about it (see the module doc). Does nothing when Ray is already
    initialized: that caller's settings stand.

    Raises :class:`UnauthenticatedRayError` (a ``ValueError``: exit 2 from the CLI) before
    anything starts when a local cluster would run without authentication."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    local = address is None and _starts_local_cluster()
    init_kwargs = {}
    if local:
        _require_token_auth()
        init_kwargs["_node_ip_address"] = LOOPBACK
        init_kwargs.update(lean_local())
    ray_logger = logging.getLogger("ray")
    consoles = _console_handlers(ray_logger)
    for h in consoles + [h for h in ray_logger.handlers if h.get_name() == _FILE_HANDLER]:
        ray_logger.removeHandler(h)
    # What ray.init logs, held until its session folder exists.
    held = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    ray_logger.addHandler(held)
    try:
        with _loopback_node_ip(local):
            ctx = ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_kwargs)
    except BaseException:
        # no session to write to: show what Ray said where Ray would have shown it
        ray_logger.removeHandler(held)
        for h in consoles:
            ray_logger.addHandler(h)
        held.setTarget(consoles[0] if consoles else logging.lastResort)
        held.close()
        raise
    file_handler = _session_file(ctx)
    held.setTarget(file_handler)
    ray_logger.removeHandler(held)
    held.close()  # flushes into the file
    ray_logger.addHandler(file_handler)
    _quiet_ray_data(file_handler)
    _worker_pool_warning_to_file()
    if local:
        from . import reaper

        reaper.watch()
        node_ip = (getattr(ctx, "address_info", None) or {}).get("node_ip_address")
        ray_logger.info("cam2seg: local Ray on node IP %s, %s=%s", node_ip, AUTH_MODE_ENV,
                        os.environ.get(AUTH_MODE_ENV))


def lean_local() -> dict:
    """The ``ray.init`` keyword arguments of a lean local Ray (see the module doc), with
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 set in this process's environment unless it is set
    (Ray Train's controller reads it there and passes it on to its workers)."""
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    return {"_system_config": {"prestart_worker_first_driver": False,
                               "num_workers_soft_limit": max(8, 2 * (os.cpu_count() or 1))}}


def _starts_local_cluster() -> bool:
    """Whether ``ray.init(address=None)`` will start a new local cluster, rather than join a
    head found on this machine (``ray start``), as ``ray.init`` itself decides."""
    try:
        from ray._private import services

        services.find_gcs_addresses.cache_clear()
        return services.canonicalize_bootstrap_address(None) is None
    except Exception:  # Ray's internals moved: let ray.init decide, without cam2seg's node IP
        return False


def _require_token_auth() -> None:
    """Token authentication for the local cluster about to start, or the explicit opt-out.

    RAY_AUTH_MODE unset (or empty): set it to ``token`` for this process and the Ray processes
    it starts, and refresh Ray's cached config (what Ray's own ``_enable_token_auth`` does);
    ``ray.init`` then creates ``~/.ray/auth_token`` if missing. Any other mode than ``token``
    is refused unless CAM2SEG_ALLOW_UNAUTHENTICATED_RAY=1."""
    mode = (os.environ.get(AUTH_MODE_ENV) or "").strip()
    if not mode:
        os.environ[AUTH_MODE_ENV] = "token"
        try:
            from ray._raylet import Config

            Config.initialize("")  # the C++ side caches RAY_AUTH_MODE as read at import
        except Exception:  # older/newer Ray: ray.init's own default (token) applies
            pass
        return
    if mode.lower() == "token":
        return
    if os.environ.get(ALLOW_UNAUTHENTICATED_ENV) == "1":
        logging.getLogger(__name__).warning(
            "%s=%s: the local Ray cluster runs without authentication (%s=1); it listens on %s only",
            AUTH_MODE_ENV, mode, ALLOW_UNAUTHENTICATED_ENV, LOOPBACK)
        return
    raise UnauthenticatedRayError(
        f"{AUTH_MODE_ENV}={mode} would start a local Ray cluster without authentication; unset "
        f"{AUTH_MODE_ENV} (or set it to token), or set {ALLOW_UNAUTHENTICATED_ENV}=1 to accept that")


@contextmanager
def _loopback_node_ip(active: bool):
    """While ``ray.init`` runs: keep ``_node_ip_address="127.0.0.1"`` as given. Ray replaces a
    loopback address by the machine's LAN address (``services.resolve_ip_for_localhost``),
    which makes every server of the node listen on all interfaces; with 127.0.0.1 as the node
    IP they bind loopback (the C++ gRPC servers, the agents, the metrics servers)."""
    if not active:
        yield
        return
    try:
        from ray._private import services

        original = services.resolve_ip_for_localhost
    except Exception:
        yield
        return

    def resolve_ip_for_localhost(host):
        return host if host == LOOPBACK else original(host)

    services.resolve_ip_for_localhost = resolve_ip_for_localhost
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _session_file(ctx) -> logging.Handler:
    """A file handler on ``<session>/logs/cam2seg-driver-<pid>.log``, or on the same name in
    the temp folder where the session folder cannot be written from here."""
    import tempfile

    session = (getattr(ctx, "address_info", None) or {}).get("session_dir")
    logs_dir = os.path.join(session, "logs") if session else tempfile.gettempdir()
    path = os.path.join(logs_dir, f"cam2seg-driver-{os.getpid()}.log")
    try:
        os.makedirs(logs_dir, exist_ok=True)
        handler = logging.FileHandler(path, delay=True)
    except OSError:
        handler = logging.FileHandler(os.path.join(tempfile.gettempdir(), os.path.basename(path)), delay=True)
    handler.set_name(_FILE_HANDLER)
    handler.setFormatter(logging.Formatter(_RAY_FORMAT))
    return handler


def _quiet_ray_data(file_handler: logging.Handler) -> None:
    """Ray Data configures its logger when imported: console and ``ray-data.log``. Import it
    now (the labeling job uses it right after) and keep the file only."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return
    data_logger = logging.getLogger("ray.data")
    consoles = _console_handlers(data_logger)
    for h in consoles:
        data_logger.removeHandler(h)
    if consoles and not data_logger.handlers:
        data_logger.addHandler(file_handler)


def _worker_pool_warning_to_file() -> None:
    """The driver's error listener (``ray._private.worker.listen_error_messages``) prints what
    the cluster pushes to drivers on stdout through ``print_to_stdstream``. Route the raylet's
    worker-pool-size warning to the log file (through the ``ray`` logger); pass everything
    else on unchanged."""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "cam2seg_original", None) is not None:
        return
    log = logging.getLogger("ray.cam2seg.pushed")

    def print_to_stdstream(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            lines = data.get("lines") or []
            keep = [line for line in lines if not _POOL_WARNING.match(str(line))]
            for line in lines:
                if line not in keep:
                    log.warning("(raylet) %s", line)
            if not keep:
                return None
            data = {**data, "lines": keep}
        return original(data, *args, **kwargs)

    print_to_stdstream.cam2seg_original = original
    worker.print_to_stdstream = print_to_stdstream


def cluster_cpus() -> float:
    """CPUs the connected cluster has."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


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
