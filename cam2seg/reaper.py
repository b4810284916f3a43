"""No Ray process of a command's own local cluster outlives the command, however it ends.

Ray ties most of a local cluster to its driver (the GCS and the raylet get ``PR_SET_PDEATHSIG``),
but the raylet's dashboard agent and runtime-env agent only notice that the raylet died and then
wait for the dead GCS: after ``kill -9`` of a ``cam2seg label`` driver both stayed for about a
minute (Ray 2.60). :func:`watch` starts a small watcher process for the driver. It holds the read
end of a pipe whose write end only the driver has; the kernel closes that end when the driver
ends in any way (exit, exception, SIGKILL, OOM kill), the watcher reads EOF and kills the Ray
processes it saw under the driver that are still alive.

The watcher only touches processes that were descendants of the driver and run Ray's own
binaries or workers (see :func:`_is_ray`); psutil checks process identity, so a reused pid is
never signalled. It ignores SIGINT and runs in its own session, so Ctrl-C and a closed terminal
reach the driver (which shuts Ray down itself) and not the watcher.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

__all__ = ["watch"]

_log = logging.getLogger(__name__)
_POLL_S = 1.0      # how often the watcher records the driver's Ray processes
_GRACE_S = 5.0     # how long killed processes get to disappear before the watcher exits

_watcher: subprocess.Popen | None = None


def watch() -> subprocess.Popen | None:
    """Start the watcher for this process (once per process; later calls return the same one).

    Returns the watcher's ``Popen`` (its stdin is the pipe), or None where psutil is missing."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        return _watcher
    try:
        import psutil  # noqa: F401
    except ImportError:  # ray[default] brings psutil; without it, Ray's own fate-sharing only
        _log.warning("psutil not installed: Ray agents may outlive a killed command by a minute")
        return None
    _watcher = subprocess.Popen([sys.executable, "-m", "cam2seg.reaper", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    return _watcher


def _is_ray(proc, ray_dir: str) -> bool:
    """Ray's processes: its binaries and scripts under the ray package, and ``ray::`` workers."""
    import psutil

    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if not cmdline:
        return False
    return cmdline[0].startswith("ray::") or any(arg.startswith(ray_dir + os.sep) for arg in cmdline[:3])


def _ray_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("ray")
    origin = spec.origin if spec and spec.origin else ""
    return os.path.dirname(os.path.realpath(origin)) if origin else os.sep + "nonexistent"


def _run(driver_pid: int) -> int:
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ended = threading.Event()

    def wait_for_eof():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            ended.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    ray_dir = _ray_dir()
    seen: dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    # Bounded by the driver's life: the pipe closes when it ends.
    while not ended.wait(_POLL_S):
        try:
            children = driver.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            if child.pid != os.getpid() and child.pid not in seen and _is_ray(child, ray_dir):
                seen[child.pid] = child
    left = [p for p in seen.values() if p.is_running()]  # is_running() also checks the create time
    for proc in left:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(left, timeout=_GRACE_S)
    return 0


if __name__ == "__main__":
    sys.exit(_run(int(sys.argv[1])))
