"""How cam2seg talks to a person: module loggers under ``cam2seg``, progress on stderr.

Library code logs with ``logging.getLogger(__name__)`` and never prints; a command prints its
result on stdout and calls :func:`configure` once, so progress (stages, epochs, commits) goes
to stderr as plain lines.

Ray workers call :func:`configure` too (the training loops do, at their start). The driver
starts Ray with ``log_to_driver=False`` (:func:`cam2seg.raycluster.ensure_ray`), so nothing a
worker writes reaches the terminal; instead, while :func:`cam2seg.train.fold_runner.run_folds`
runs, the driver keeps a small named actor, the *log sink* (:class:`LogRelay`). In a worker,
:func:`configure` finds it and sends each ``cam2seg.*`` record there; the driver drains it and
emits the records through its own ``cam2seg`` loggers, one line each, in the order each worker
sent them. A worker that finds no sink (or loses it) writes its lines to its own stderr, which
is its log file under Ray's session folder.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure", "LogRelay"]

_HANDLER_NAME = "cam2seg-progress"
_SINK_NAME = "cam2seg-log-sink"
# How long a worker waits for the sink to take one record before it writes to its stderr instead.
_SEND_TIMEOUT_S = 30.0


def configure(level: int = logging.INFO, stream=None) -> None:
    """Send ``cam2seg.*`` records at ``level`` and above to ``stream`` (default: stderr at the
    time of the call) as bare messages. In a Ray worker of a job whose driver holds a log sink
    (and with no ``stream`` given), they go to the driver instead. Idempotent: a second call
    only updates level and stream."""
    root = logging.getLogger("cam2seg")
    root.setLevel(level)
    mine = [h for h in root.handlers if h.get_name() == _HANDLER_NAME]
    sink = None
    if stream is None:
        if mine and isinstance(mine[0], _SinkHandler) and not mine[0].broken:
            return
        sink = _find_sink()
    if sink is not None:
        handler = _SinkHandler(sink)
    elif mine and isinstance(mine[0], logging.StreamHandler):
        try:
            mine[0].setStream(stream or sys.stderr)
        except ValueError:  # the old stream is closed (setStream flushes it): just replace it
            mine[0].stream = stream or sys.stderr
        return
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    for h in mine:
        root.removeHandler(h)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    # the record is shown once, here; an application's root handler would show it twice
    root.propagate = False


# --- the channel from Ray workers to the driver ------------------------------------------------


class _LogSink:
    """Records from workers, in arrival order, until the driver drains them."""

    def __init__(self):
        self._records: list[tuple[str, int, str]] = []

    def put(self, record: tuple[str, int, str]) -> None:
        self._records.append(record)

    def drain(self) -> list[tuple[str, int, str]]:
        out, self._records = self._records, []
        return out


def _sink_name() -> str:
    import ray

    # Named actors live in the job's namespace; the job id keeps two jobs that share a
    # namespace apart too.
    return f"{_SINK_NAME}-{ray.get_runtime_context().get_job_id()}"


class LogRelay:
    """The driver's end of the channel: creates (or gets) this job's log sink; :meth:`poll`
    and :meth:`flush` emit the records waiting there through the driver's own loggers.
    Create it after ``ray.init``; :meth:`close` it when the workers are done. A sink that
    fails only stops the relaying (the workers then keep their lines in their log files):
    it never fails the work."""

    def __init__(self):
        import ray

        # No CPU: an actor that holds one would keep it from the training workers.
        cls = ray.remote(num_cpus=0, max_restarts=0)(_LogSink)
        self._sink = cls.options(name=_sink_name(), get_if_exists=True).remote()
        self._pending = None  # the drain call in flight: its records are emitted once it returns
        self._dead = False

    def poll(self) -> int:
        """Emit what has arrived, without waiting; returns how many records."""
        return self._collect(0.0)

    def flush(self, timeout: float = 30.0) -> int:
        """Emit everything the sink holds now, waiting up to ``timeout`` s for it."""
        stale = self._pending is not None  # a drain sent earlier may miss the latest records
        n = self._collect(timeout)
        if stale and self._pending is None:
            n += self._collect(timeout)
        return n

    def close(self, timeout: float = 30.0) -> None:
        """Emit what is left, then end the sink. Safe while an error is on its way up."""
        import ray

        self.flush(timeout)
        self._dead = True
        try:
            ray.kill(self._sink)
        except Exception:
            pass

    def _collect(self, timeout: float) -> int:
        import ray

        if self._dead:
            return 0
        try:
            if self._pending is None:
                self._pending = self._sink.drain.remote()
            ready, _ = ray.wait([self._pending], timeout=timeout)
            if not ready:
                return 0
            ref, self._pending = self._pending, None
            records = ray.get(ref)
        except Exception as e:
            self._dead = True
            logging.getLogger(__name__).warning(f"the workers' log lines can no longer be shown here ({e}); "
                                                "they are in Ray's worker log files")
            return 0
        for name, levelno, msg in records:
            logger = logging.getLogger(name)
            if logger.isEnabledFor(levelno):
                logger.handle(logging.makeLogRecord({"name": name, "levelno": levelno,
                                                     "levelname": logging.getLevelName(levelno), "msg": msg}))
        return len(records)


def _find_sink():
    """The driver's log sink when this process is a Ray worker and the driver holds one."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is no Ray worker
    if ray is None:
        return None
    try:
        if not ray.is_initialized() or ray._private.worker.global_worker.mode != ray.WORKER_MODE:
            return None
        return ray.get_actor(_sink_name())
    except Exception:  # no sink in this job (ValueError), or Ray's internals moved
        return None


class _SinkHandler(logging.Handler):
    """Sends each record, formatted, to the driver's log sink and waits until it is there, so
    a worker's lines arrive in order and none is lost when the worker exits."""

    def __init__(self, sink):
        super().__init__()
        self._sink = sink
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if not self.broken:
            try:
                import ray

                ray.get(self._sink.put.remote((record.name, record.levelno, msg)), timeout=_SEND_TIMEOUT_S)
                return
            except Exception:  # the driver is gone or stuck: keep the line in this worker's log
                self.broken = True
        print(msg, file=sys.stderr, flush=True)
