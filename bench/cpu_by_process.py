"""CPU seconds by process kind while a command runs: where a Ray-heavy run's CPU goes.

Polls every process that was not running before the command (its Ray clusters, workers, actors,
subprocesses) every ``--every`` seconds and keeps each one's last CPU time (user + system) and
kind: the Ray actor or task name from its process title (``ray::RayTrainWorker``; ``IDLE`` for a
worker never given work), else the Ray service's script or the command line's start. A process
that exits between two polls loses at most one interval, so the totals are lower bounds; the
poller's own CPU is not counted.

    .venv/bin/python bench/cpu_by_process.py [--every 0.5] -- COMMAND [ARGS...]

e.g. ``-- .venv/bin/python -m pytest tests -q`` for the whole suite (BENCHMARKS.md, "Test suite
time (2026-12-03, second session)"), or one ``cam2seg train-classifiers``.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import time

import psutil

_SERVICE = re.compile(r"(raylet|gcs_server|dashboard\.py|agent\.py|runtime_env/agent/main\.py|log_monitor\.py|"
                      r"monitor\.py|default_worker\.py|setup_worker|cam2seg \S+)")


def kind(cmdline: str) -> str:
    m = re.search(r"ray::(\w+)", cmdline) or _SERVICE.search(cmdline)
    return m.group(1) if m else cmdline[:60]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=float, default=0.5, help="seconds between polls")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    before = {p.pid for p in psutil.process_iter()}
    seen: dict[int, tuple[str, float]] = {}
    t0 = time.time()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        for p in psutil.process_iter():
            if p.pid in before:
                continue
            try:
                cl, ct = " ".join(p.cmdline()), p.cpu_times()
            except psutil.Error:
                continue
            if not cl:
                continue
            k = kind(cl)
            # a Ray worker starts as setup_worker/default_worker and takes its actor's name later
            if p.pid in seen and (k.endswith(".py") or k == "setup_worker"):
                k = seen[p.pid][0]
            seen[p.pid] = (k, ct.user + ct.system)
        time.sleep(args.every)
    totals, counts = collections.Counter(), collections.Counter()
    for k, t in seen.values():
        totals[k] += t
        counts[k] += 1
    print(f"exit {proc.returncode}, wall {time.time() - t0:.1f} s, CPU {sum(totals.values()):.1f} s "
          f"in {len(seen)} processes")
    for k, t in totals.most_common():
        print(f"{t:8.1f} s  x{counts[k]:<4} {k}")


if __name__ == "__main__":
    main()
