"""A training worker's memory, split by kind, for the fold's ``final.json``.

``ru_maxrss`` (the peak resident set) counts every page the process has touched and still maps,
including Ray's object store: Ray Data hands a streamed worker its blocks as zero-copy views of
that shared memory, so each block read adds shared pages to the worker's resident set until Ray
reuses them, whatever the worker itself keeps. What grows if a worker held its fold is its
private (anonymous) memory. Linux reports the two apart in ``/proc/self/status`` (``RssAnon``,
``RssShmem``, ``RssFile``, in kB); :class:`MemoryPeaks` samples them at each training step and
keeps each one's maximum. Elsewhere it reports only the peak resident set.
"""

from __future__ import annotations

import resource
import sys

__all__ = ["MemoryPeaks", "peak_rss_mib", "status_mib"]

_FIELDS = {"RssAnon": "private", "RssShmem": "shared", "RssFile": "file"}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def status_mib(path: str = "/proc/self/status") -> dict[str, float] | None:
    """``{"private": MiB, "shared": MiB, "file": MiB}``: this process's resident memory now, by
    kind; None where the kernel does not report it (not Linux, or a kernel before 4.5)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in _FIELDS:
            out[_FIELDS[name]] = round(int(value.split()[0]) / 1024, 1)
    return out if len(out) == len(_FIELDS) else None


def _higher(peaks: dict[str, float] | None, now: dict[str, float]) -> dict[str, float]:
    return now if peaks is None else {k: max(v, now[k]) for k, v in peaks.items()}


class MemoryPeaks:
    """The maximum of each kind of :func:`status_mib` over the calls to :meth:`sample`, over the
    whole fold (:meth:`fields`) and since the last :meth:`epoch_fields`. An epoch's peak beside the
    next tells a worker that holds more as more rows pass (a leak: the peaks climb epoch by epoch)
    from the step-to-step spread of the allocator (they do not)."""

    def __init__(self):
        self.peaks: dict[str, float] | None = None
        self.recent: dict[str, float] | None = None
        self.sample()

    def sample(self) -> None:
        now = status_mib()
        if now is None:
            return
        self.peaks, self.recent = _higher(self.peaks, now), _higher(self.recent, now)

    def epoch_fields(self) -> dict:
        """An epoch's history fields, ``peak_private_mib`` / ``peak_shared_mib``: the peaks since
        the previous call (empty where not sampled), which then start again."""
        out = {} if self.recent is None else {f"peak_{k}_mib": self.recent[k] for k in ("private", "shared")}
        self.recent = None
        return out

    def fields(self) -> dict:
        """The fold's ``final.json`` fields: ``peak_rss_mib`` and, where sampled,
        ``peak_private_mib`` / ``peak_shared_mib`` / ``peak_file_mib``."""
        out = {"peak_rss_mib": peak_rss_mib()}
        if self.peaks is not None:
            self.sample()
            out.update({f"peak_{k}_mib": v for k, v in self.peaks.items()})
        return out
