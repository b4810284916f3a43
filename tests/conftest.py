"""Shared fixtures: a small synthetic archive, a real S3 endpoint (moto server) and a real Ray head
(`ray start --head`), both on 127.0.0.1 and stopped by their pids."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


BIN = Path(sys.executable).parent


def run_cli(argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of an in-process ``cam2seg`` command (the console script is
    ``cam2seg.cli.main``; it joins the Ray this process already runs)."""
    import io

    from cam2seg import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def captured_logs():
    """The messages cam2seg's loggers emit inside the block (progress lines), as a list."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("cam2seg")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="session")
def log_lines():
    """:func:`captured_logs` for tests: ``with log_lines() as lines: ...``."""
    return captured_logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str) -> None:
    """Poll ``cond()`` every 0.5 s until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def registered_checkpoints(train_root, fold: int) -> list[str]:
    """Checkpoint folder names Ray Train's controller recorded for ``fold`` under a ``_train``
    folder (only recorded ones survive a restart); [] before the first."""
    import json
    from pathlib import Path

    snaps = sorted(Path(train_root).glob(f"*/runs/fold-{fold}/checkpoint_manager_snapshot.json"))
    if not snaps:
        return []
    try:
        return [r["checkpoint_dir_name"] for r in json.loads(snaps[0].read_text())["checkpoint_results"]]
    except (ValueError, KeyError):
        return []


def s3_env(endpoint: str) -> dict:
    """The standard variables boto/s3fs read, for the moto server at ``endpoint``."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}


def stop_process(proc: subprocess.Popen, timeout: float = 10, group: bool = False) -> None:
    """SIGTERM, SIGKILL after ``timeout`` s; ``group``: then whatever is left of the process group
    it leads (started with ``start_new_session``)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def local_ray():
    """One in-process local Ray (2 CPUs, as CI has) for every module that runs stages in this
    process, started once: a start costs ~6 s and ~9 CPU-s on 2 cores. It is lean as the one a
    command starts (:func:`cam2seg.raycluster.lean_local`). Shut down at the end of the session."""
    import ray

    from cam2seg.raycluster import lean_local

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", **lean_local())
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server process on 127.0.0.1, as s3fs's own tests use; yields its endpoint URL.

    Stopped by its pid at the end of the session.
    """
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    assert exe, "moto_server not found: install the dev extra (moto[server])"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}")
                time.sleep(0.2)
        yield endpoint
    finally:
        stop_process(proc)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Point boto/s3fs at the moto server through the standard environment variables.

    Yields an s3fs filesystem; every bucket is emptied afterwards so tests stay independent.
    """
    import s3fs

    for k, v in s3_env(s3_server).items():
        monkeypatch.setenv(k, v)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    yield fs
    urllib.request.urlopen(urllib.request.Request(s3_server + "/moto-api/reset", method="POST"), timeout=5)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory):
    """A 60-image synthetic archive at 64x400 (session-wide, read-only for tests)."""
    from cam2seg.synthetic import synth

    out = tmp_path_factory.mktemp("archive")
    synth.write_archive(str(out), images=60, height=64, width=400, seed=3, progress=None)
    return out


# A stage-1 model trained once per session and shared (read-only) by the tests that need one.
# Small enough for 2 CPU cores, big enough to learn: 480 images at 64x400, balanced classes, a
# CPU-friendly encoder and a higher encoder learning rate than the paper's (which assumes
# ImageNet weights; these models start from random init).
LEARN_CFG = dict(encoder="mobilenetv3_small_100", folds=2, epochs=10, size=(64, 400), batch_size=16,
                 lr_encoder=5e-3, keep_checkpoints=True, load_threads=2)

# Two long commands run in the background: the stage-1 model above is trained by a real `cam2seg
# train-classifiers`, and the demo's `quick` preset runs as a real `cam2seg demo`, each with its own
# local Ray in its own Ray temp folder. They start as soon as the tests are collected, at the lowest
# CPU priority, and the tests that read them run last: their minutes then fill the CPU time the rest
# of the suite leaves idle (Ray start-ups wait a lot) instead of slowing those tests (at equal
# priority the training made a two-thread torch test 30x slower). Each is stopped by its pid when
# the session ends.
_BACKGROUND = pytest.StashKey[dict]()


def _stage1_command(root: Path) -> tuple[list[str], dict]:
    import json

    from cam2seg.synthetic import synth

    data, out, cfg = root / "archive", root / "model", root / "classifier.yaml"
    synth.write_archive(str(data), images=480, height=64, width=400, seed=3, mix="balanced", progress=None)
    cfg.write_text(json.dumps({"classifier": {**LEARN_CFG, "size": list(LEARN_CFG["size"])}}))  # YAML's subset
    return (["train-classifiers", "--data", str(data), "--out", str(out), "--config", str(cfg)],
            {"data": str(data), "out": str(out)})


def _demo_command(root: Path) -> tuple[list[str], dict]:
    return ["demo", "--preset", "quick", "--workdir", str(root / "run")], {"work": str(root / "run")}


# fixture name -> what its command is (argv after `cam2seg`, and facts for the fixture), in the order
# their readers run
_COMMANDS = {"trained_classifier": _stage1_command, "demo_run": _demo_command}


def _uses(item, name: str) -> bool:
    return name in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    rank = {id(item): next((n for n, name in enumerate(_COMMANDS) if _uses(item, name)), -1) for item in items}
    items.sort(key=lambda item: rank[id(item)])  # stable: the others keep their order, first


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    jobs = session.config.stash.setdefault(_BACKGROUND, {})
    for name, command in _COMMANDS.items():
        if not any(_uses(item, name) for item in session.items):
            continue
        root = Path(tempfile.mkdtemp(prefix="c2s-bg-"))  # short: Ray's socket paths live under it
        argv, facts = command(root)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(root / "ray")}
        env.pop("RAY_ADDRESS", None)
        with open(root / "stdout", "w") as out, open(root / "stderr", "w") as err:
            proc = subprocess.Popen(["nice", "-n", "19", str(BIN / "cam2seg"), *argv], stdout=out, stderr=err,
                                    env=env, start_new_session=True)
        # Its own session is its own scheduling group where Linux groups by session (autogroup):
        # the group's nice value is the one that counts against the tests'.
        with contextlib.suppress(OSError):
            Path(f"/proc/{proc.pid}/autogroup").write_text("19")
        jobs[name] = {"proc": proc, "root": root, "t0": time.time(), **facts}


def pytest_sessionfinish(session):
    for job in session.config.stash.get(_BACKGROUND, {}).values():
        stop_process(job["proc"], 30, group=True)  # an ended one: only what is left of its group (its Ray)
        shutil.rmtree(job["root"], ignore_errors=True)


def background_result(request, name: str, timeout: float = 600) -> dict:
    """Wait for the background command of fixture ``name``; its facts plus returncode, stdout,
    stderr and ``seconds`` (from its start to its last output)."""
    job = request.config.stash[_BACKGROUND][name]
    try:
        job["proc"].wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the background command {job['proc'].args} did not end within {timeout} s")
    out, err = (job["root"] / "stdout").read_text(), (job["root"] / "stderr").read_text()
    seconds = max(os.path.getmtime(job["root"] / f) for f in ("stdout", "stderr")) - job["t0"]
    return {**job, "returncode": job["proc"].returncode, "stdout": out, "stderr": err, "seconds": seconds}


@pytest.fixture(autouse=True)
def _one_torch_thread_while_commands_run(request):
    """While a background command runs, tests in this process run torch on one thread: two
    OpenMP threads on two busy cores wait on each other at every op (a CAM test took 68 s, not 2)."""
    jobs = request.config.stash.get(_BACKGROUND, {}).values()
    if not any(job["proc"].poll() is None for job in jobs) or "torch" not in sys.modules:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_classifier(request):
    """The stage-1 model of ``LEARN_CFG`` (see above)."""
    from cam2seg.artifact import load_card
    from cam2seg.config import ClassifierConfig

    run = background_result(request, "trained_classifier")
    assert run["returncode"] == 0, run["stderr"][-4000:]
    return {"data": run["data"], "out": run["out"], "card": load_card(run["out"]),
            "cfg": ClassifierConfig(**LEARN_CFG), "seconds": run["seconds"]}


@pytest.fixture(scope="session")
def demo_run(request):
    """`cam2seg demo --preset quick` (see above): its workdir, returncode, stdout and stderr."""
    return background_result(request, "demo_run")


def commit_rows(root: str, rows: list[dict], model_version: str = "m-1"):
    """Commit ``rows`` (dicts of the store's mask columns, ``run_id`` filled in here) as one
    complete run of the label store at ``root``; returns the run's marker."""
    import pyarrow as pa

    from cam2seg import store

    run = store.new_run_id()
    table = pa.Table.from_pylist([{**r, "run_id": run} for r in rows], schema=store.MASK_SCHEMA)
    return store.commit(root, run, {"parts": {"masks": [store.write_part(root, "masks", run, table)], "errors": []},
                                    "model_version": model_version, "complete": True})


def write_random_artifact(out: str, encoder: str = "mobilenetv3_small_100", size=(64, 400), folds: int = 2,
                          seed: int = 0, image_size=(64, 400)) -> "ModelCard":  # noqa: F821
    """A random-init classifier artifact: labeling tests need a model, not a good one.

    Confidence 0 so every class gets a map to threshold (random probabilities hover at 0.5)."""
    import torch

    from cam2seg.artifact import ModelCard, write_artifact
    from cam2seg.models.classifier import Classifier
    from cam2seg.preprocess import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    states = [Classifier(encoder, hidden=16).state_dict() for _ in range(folds)]
    card = ModelCard(kind="classifier", architecture=encoder, num_classes=4, class_ids=[1, 2, 3, 4],
                     input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, head={"hidden": 16, "dropout": 0.1},
                     folds=folds, fold_files=[], data={"image_size": list(image_size)},
                     postprocess={"confidence": 0.0, "threshold": 0.3, "min_seg_len": 0})
    return write_artifact(out, card, states)


@pytest.fixture(scope="session")
def random_artifact():
    """:func:`write_random_artifact`, for tests that need a model artifact quickly."""
    return write_random_artifact


def write_random_segmenter(out: str, size=(64, 400), folds: int = 2, seed: int = 0, channels: int = 3,
                           metrics: dict | None = None) -> "ModelCard":  # noqa: F821
    """A random-init segmenter artifact (4 classes, a narrow U-Net): composition and labeling tests
    need a segmenter, not a good one."""
    import torch

    from cam2seg.artifact import ModelCard, write_artifact
    from cam2seg.models.segmenter import Segmenter
    from cam2seg.preprocess import normalisation

    torch.manual_seed(seed)
    states = [Segmenter("Unet", "tu-mobilenetv3_small_100", 4, [16, 16, 8, 8, 8], channels).state_dict()
              for _ in range(folds)]
    mean, std = normalisation(channels)  # 3 channels read grey images replicated, as the random classifier does
    card = ModelCard(kind="segmenter", architecture="tu-mobilenetv3_small_100", num_classes=4,
                     class_ids=[1, 2, 3, 4], input_size=size, grayscale=True, mean=mean, std=std,
                     head={"architecture": "Unet", "decoder_channels": [16, 16, 8, 8, 8]}, folds=folds,
                     fold_files=[], metrics=metrics or {}, data={"image_size": list(size)})
    return write_artifact(out, card, states)


@pytest.fixture(scope="session")
def random_segmenter():
    """:func:`write_random_segmenter`."""
    return write_random_segmenter


@pytest.fixture(scope="module")
def s3_module(s3_server):
    """S3 settings in this process's environment for a whole module (so commands and Ray
    clusters started from it inherit them, as cluster nodes get them from instance roles or
    secrets); yields an s3fs filesystem. The server is reset and the environment restored after."""
    import s3fs

    env = s3_env(s3_server)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield s3fs.S3FileSystem()
    finally:
        urllib.request.urlopen(urllib.request.Request(s3_server + "/moto-api/reset", method="POST"), timeout=5)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """`ray start --head --block` on 127.0.0.1 with its own temp dir (so no other test's
    ``ray.init()`` finds it) and its own ports; yields the job API address, the environment for
    `ray` commands, a job client factory and the venv's bin folder.
    Stopped by its pid (SIGTERM: Ray's handler stops the processes it started)."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="c2s-ray-")  # short: Ray's socket paths live under it
    # Ray's token authentication, with a token of this session (not ~/.ray/auth_token, which may
    # or may not exist): the job API refuses requests without it.
    token = secrets.token_hex(32)
    env = {**os.environ, **s3_env(s3_server), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}   # nothing to drain at the end of a test
    # (and without what the in-process Ray's lean settings put in this process's environment:
    # an operator's cluster runs Ray Train's preemption watcher)
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        env.pop(var, None)
    dash = free_port()
    ports = {"port": free_port(), "dashboard-port": dash, "ray-client-server-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "metrics-export-port": free_port(),
             "runtime-env-agent-port": free_port(), "node-manager-port": free_port(),
             "object-manager-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
           "--object-store-memory=200000000", f"--temp-dir={temp}", "--disable-usage-stats",
           *(f"--{k}={v}" for k, v in ports.items())]
    log_path = Path(temp) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    head = {"address": address, "env": env, "bin": BIN,
            "client": lambda: JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                head["client"]().get_version()
                break
            except Exception:  # not up yet: refused, or the dashboard's modules still loading
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield head
    finally:
        stop_process(proc, 60, group=True)
        shutil.rmtree(temp, ignore_errors=True)
