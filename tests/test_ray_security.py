"""The local Ray a cam2seg command starts is never open and unauthenticated (issue 16, item 1).

* default (RAY_AUTH_MODE unset): every listening TCP socket of the command's process tree is
  on loopback, and token authentication is in force: the GCS and the raylet were started with
  RAY_AUTH_MODE=token in their environment (what they read to decide), and Ray created the
  token (``$HOME/.ray/auth_token``, HOME being a temp folder here);
* RAY_AUTH_MODE=disabled: ``cam2seg train-classifiers`` refuses with exit 2 and a line naming
  RAY_AUTH_MODE, before any Ray process or session folder exists;
* RAY_AUTH_MODE=disabled with CAM2SEG_ALLOW_UNAUTHENTICATED_RAY=1: it runs, on loopback only.

The runs that need a cluster are a ``python -c`` that calls ``ensure_ray()`` (as every command
does), starts an actor, then waits for a stop file; the sockets are read with psutil while it
waits. Each process is stopped by its pid and process group; Ray's temp folder is a short temp
path (its socket paths live under it).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from cam2seg.synthetic import synth

from conftest import stop_process

pytestmark = pytest.mark.slow

CAM2SEG = str(Path(sys.executable).parent / "cam2seg")

JOB = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import ray
    from cam2seg.raycluster import ensure_ray

    ensure_ray()

    @ray.remote
    class Pinger:
        def ping(self):
            return os.getpid()

    actor = Pinger.remote()
    ray.get(actor.ping.remote(), timeout=120)
    ready, stop = Path(sys.argv[1]), Path(sys.argv[2])
    ready.write_text(os.environ.get("RAY_AUTH_MODE", "") + " " + os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", ""))
    deadline = time.monotonic() + 120
    while not stop.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    ray.shutdown()
""")


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _listening(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``procs``."""
    found = set()
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((name, c.laddr.ip, c.laddr.port))
        except psutil.Error:  # exited meanwhile
            pass
    return found


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path / "home"), **extra}
    (tmp_path / "home").mkdir(exist_ok=True)
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "CAM2SEG_ALLOW_UNAUTHENTICATED_RAY",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):  # (the in-process Ray's lean_local sets it here)
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="c2s-rs-")  # short: Ray's socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The two jobs the tests below read, each with its own home and Ray temp folder: the default
# (token auth), and auth disabled with the opt-in, its driver SIGKILLed.
JOBS = {"default": {}, "opt-in, killed": dict(kill=True, RAY_AUTH_MODE="disabled", CAM2SEG_ALLOW_UNAUTHENTICATED_RAY="1")}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Both JOBS run at once (each about 11 s, mostly waiting for Ray to start and stop):
    name -> what :func:`_run_job` returns, plus its ``home``."""
    from concurrent.futures import ThreadPoolExecutor

    dirs = {name: (tmp_path_factory.mktemp("job"), tempfile.mkdtemp(prefix="c2s-rs-")) for name in JOBS}
    try:
        with ThreadPoolExecutor(len(JOBS)) as pool:
            futures = {name: pool.submit(_run_job, *dirs[name], **kw) for name, kw in JOBS.items()}
            yield {name: {**f.result(), "home": dirs[name][0] / "home"} for name, f in futures.items()}
    finally:
        for _, ray_tmp in dirs.values():
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _run_job(tmp_path: Path, ray_tmp: str, kill: bool = False, **extra: str) -> dict:
    """Run JOB until its actor answered, read its process tree's listening sockets for a few
    seconds (agents bind late), stop it (``kill``: SIGKILL the driver alone). Returns the sockets,
    the tree's processes' RAY_AUTH_MODE by name, what the job saw as RAY_AUTH_MODE, and
    ``left``: the tree's processes still running 20 s after the end."""
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    env = _env(tmp_path, RAY_TMPDIR=ray_tmp, **extra)
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(ready), str(stop)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=tmp_path)  # not the checkout: cam2seg as installed (or PYTHONPATH)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, f"job exited {proc.returncode}: {proc.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "job not ready after 90 s"
            time.sleep(0.3)
        sockets: set = set()
        auth_modes: dict[str, set] = {}
        for _ in range(6):  # ~3 s
            procs = _tree(proc.pid)
            seen.update({p.pid: p for p in procs})
            sockets |= _listening(procs)
            for p in procs:
                try:
                    auth_modes.setdefault(p.name(), set()).add(p.environ().get("RAY_AUTH_MODE"))
                except psutil.Error:
                    pass
            time.sleep(0.5)
        if kill:
            proc.kill()
        else:
            stop.write_text("")
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = ""
        deadline = time.monotonic() + 20
        left = [p for p in seen.values() if p.is_running()]
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = [p for p in left if p.is_running()]
        print(f"listening ({extra or 'default'}):", *sorted(sockets), sep="\n  ")
        job_auth_mode, preemption_watcher = ready.read_text().split(" ")
        return {"sockets": sockets, "auth_modes": auth_modes, "job_auth_mode": job_auth_mode,
                "preemption_watcher": preemption_watcher,
                "rc": proc.returncode, "out": out, "seen": seen,
                "left": [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in left if p.is_running()]}
    finally:
        stop_process(proc, 20, group=True)
        for p in seen.values():  # what left the process group (Ray's own start_new_session), by pid
            try:
                if p.is_running():
                    p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass


def test_default_local_ray_listens_on_loopback_only_with_token_auth(jobs):
    run = jobs["default"]
    assert run["rc"] == 0, run["out"][-4000:]
    assert not run["left"], f"outlived the command: {run['left']}"
    names = {name for name, _, _ in run["sockets"]}
    assert "gcs_server" in names and "raylet" in names, run["sockets"]  # the check is not vacuous
    open_ = sorted(s for s in run["sockets"] if not _is_loopback(s[1]))
    assert not open_, f"listening beyond loopback: {open_}"
    # Token auth in force: the servers read RAY_AUTH_MODE at start, and Ray made the token.
    assert run["job_auth_mode"] == "token"
    for name in ("gcs_server", "raylet"):
        assert run["auth_modes"].get(name) == {"token"}, run["auth_modes"]
    assert (run["home"] / ".ray" / "auth_token").stat().st_size > 0
    # Lean on a small machine (cam2seg.raycluster.lean_local): no Ray Train preemption watcher.
    assert run["preemption_watcher"] == "0"


def test_auth_disabled_is_refused_before_ray_starts(tmp_path, ray_tmp):
    data, out = tmp_path / "archive", tmp_path / "model"
    synth.write_archive(str(data), images=16, height=32, width=128, seed=0, mix="balanced", progress=None)
    (tmp_path / "c.yaml").write_text("classifier: {encoder: mobilenetv3_small_050, folds: 2, epochs: 2, "
                                     "size: [32, 128], batch_size: 8}\n")
    env = _env(tmp_path, RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([CAM2SEG, "train-classifiers", "--data", str(data), "--out", str(out),
                             "--config", str(tmp_path / "c.yaml")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        stop_process(proc, 10, group=True)
    assert proc.returncode == 2, stderr[-4000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cam2seg train-classifiers: error: "), stderr
    assert "RAY_AUTH_MODE" in lines[0] and "CAM2SEG_ALLOW_UNAUTHENTICATED_RAY" in lines[0], stderr
    assert not list(Path(ray_tmp).rglob("session_*")), "a Ray session was started"
    assert not (tmp_path / "home" / ".ray").exists()


def test_auth_disabled_with_opt_in_runs_on_loopback_and_leaves_nothing_after_sigkill(jobs):
    """Also issue 16 item 9: after SIGKILL of the driver alone, no process it started is left
    (Ray's dashboard and runtime-env agents used to stay a minute)."""
    run = jobs["opt-in, killed"]
    assert run["rc"] == -signal.SIGKILL, run["out"][-4000:]
    assert len(run["seen"]) >= 6, sorted(run["seen"])  # the tree was seen: gcs, raylet, agents, worker, watcher
    assert not run["left"], f"outlived the driver: {run['left']}"
    assert run["job_auth_mode"] == "disabled"
    assert "gcs_server" in {name for name, _, _ in run["sockets"]}, run["sockets"]
    open_ = sorted(s for s in run["sockets"] if not _is_loopback(s[1]))
    assert not open_, f"listening beyond loopback: {open_}"
    assert "without authentication" in run["out"] and "CAM2SEG_ALLOW_UNAUTHENTICATED_RAY=1" in run["out"]
