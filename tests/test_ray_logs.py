"""Real ``cam2seg train-classifiers`` commands on Ray, as a person runs them: a command whose
training worker and then whole process group are killed continues when run again; two
commands at once on one machine each run their own local Ray; and what they print is their
own lines, every fold's epoch lines, and nothing of Ray's.

First one command is started, fold 0's training worker killed by pid once it has a
checkpoint (the fold resumes), then the command's process group once fold 0 checkpointed
again. Then that command again (it must continue) and a fresh one run at the same time in
subprocesses sharing one Ray temp folder, as two commands share ``/tmp/ray``. The fresh one
keeps everything in object storage (archive, checkpoints, artifact on the moto S3 server) and
trains each fold with DDP on two Ray Train workers. Every test here reads these three runs: a
Ray Train run costs ~20 s on 2 CPU cores before its first step, so each one is paid once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from cam2seg.models.classifier import load_fold_models
from cam2seg.synthetic import synth

from conftest import registered_checkpoints, stop_process, wait_for

pytestmark = pytest.mark.slow

CAM2SEG = str(Path(sys.executable).parent / "cam2seg")
EPOCHS, FOLDS = 2, 2
# The killed command: enough epochs that it is still training after a worker kill, a resume and
# one more checkpoint (its epochs take well under a second).
KILL_EPOCHS = 6
KILL_CONFIG = f"""classifier:
  encoder: mobilenetv3_small_100
  folds: {FOLDS}
  epochs: {KILL_EPOCHS}
  size: [32, 128]
  batch_size: 8
  keep_checkpoints: true
"""
CONFIG = f"""classifier:
  encoder: mobilenetv3_small_050
  folds: {FOLDS}
  epochs: {EPOCHS}
  size: [32, 200]
  batch_size: 8
  swa_epochs: 1
  load_threads: 1
  workers_per_fold: 2
  cpus_per_worker: 0.5
  keep_checkpoints: true
"""
S3_DATA, S3_MODEL = "s3://c2s-logs/archive", "s3://c2s-logs/model"

# Lines that come from Ray, not from cam2seg: Ray's Python log format, its C++ log format, the
# "(ActorName pid=...)" / "(raylet)" prefixes of forwarded output, its log dedup note.
RAY_LINE = re.compile(
    r"placement_group_cleaner|core_worker|PreemptionWatcher|\(raylet\)|\((\w+ )?pid=\d+|"
    r"repeated \d+x across cluster|^\S+ \S+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ --|"
    r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\]|^(WARNING|ERROR)\b|Traceback")


def _killed_run(root: Path, env: dict) -> dict:
    """Start the killed command's first run; kill fold 0's worker once it has a checkpoint, then
    the command's process group once fold 0 resumed and checkpointed again."""
    import psutil

    data, out = root / "archive-k", root / "model-k"
    synth.write_archive(str(data), images=60, height=32, width=128, seed=1, mix="balanced", progress=None)
    (root / "k.yaml").write_text(KILL_CONFIG)
    cmd = [CAM2SEG, "train-classifiers", "--data", str(data), "--out", str(out), "--config", str(root / "k.yaml")]
    log = root / "run1.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    victim_cmdline = ""
    try:
        runs = out / "_train"
        wait_for(lambda: registered_checkpoints(runs, 0), 240, "a registered checkpoint of fold 0")
        ckpt_dir = next(runs.glob(f"*/runs/fold-0/{registered_checkpoints(runs, 0)[-1]}"))
        victim = psutil.Process(json.loads((ckpt_dir / "state.json").read_text())["pid"])
        victim_cmdline = " ".join(victim.cmdline())
        before = set(registered_checkpoints(runs, 0))  # Ray Train keeps 2: a new name is a new checkpoint
        victim.kill()
        wait_for(lambda: "resuming at epoch" in log.read_text(), 240, "fold 0 to resume")
        wait_for(lambda: set(registered_checkpoints(runs, 0)) - before, 240, "fold 0 to checkpoint again")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    return {"cmd": cmd, "out": out, "log": log.read_text(), "victim": victim_cmdline,
            "finished": (out / "model.json").exists()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, s3_module):
    """The killed command's first run; then both commands' (returncode, stdout, stderr) when run
    at once, and the Ray temp folder they shared."""
    root = tmp_path_factory.mktemp("ray-logs")
    (root / "c.yaml").write_text(CONFIG)
    first_tmp = tempfile.mkdtemp(prefix="c2s-rk-")  # short: Ray's socket paths live under it
    ray_tmp = tempfile.mkdtemp(prefix="c2s-rl-")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    procs = []
    try:
        killed = _killed_run(root, {**env, "RAY_TMPDIR": first_tmp})
        s3_module.mkdir(S3_DATA.removeprefix("s3://").split("/")[0])
        synth.write_archive(S3_DATA, images=24, height=32, width=200, seed=2, mix="balanced", progress=None)
        fresh = [CAM2SEG, "train-classifiers", "--data", S3_DATA, "--out", S3_MODEL, "--config", str(root / "c.yaml")]
        for cmd in (killed["cmd"], fresh):
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env={**env, "RAY_TMPDIR": ray_tmp}, start_new_session=True))
        t0 = time.perf_counter()
        outs = [p.communicate(timeout=400) for p in procs]
        print(f"two train-classifiers at once: {time.perf_counter() - t0:.0f}s")
        yield {"runs": [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)], "ray_tmp": Path(ray_tmp),
               "killed": killed, "fs": s3_module}
    finally:
        for p in procs:  # the commands, then whatever is left of their process groups (Ray's)
            stop_process(p, 30, group=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(first_tmp, ignore_errors=True)


def test_killed_worker_resumes_and_killed_command_continues(two_runs):
    """Fold 0's worker, killed by pid, resumed from its checkpoint inside the first run; the
    command, killed with its process group, continued when run again instead of starting over."""
    killed = two_runs["killed"]
    assert "RayTrainWorker" in killed["victim"], killed["victim"]
    assert not killed["finished"], "the first run finished before its process group was killed"
    rc, out, err = two_runs["runs"][0]
    text = out + err
    assert rc == 0, text[-3000:]
    # Fold 0 had checkpointed past its first epoch: the second run continues it (or reuses it
    # if it had finished), and never trains its first epoch again.
    resumed = re.search(rf"\[fold 0\] resuming at epoch (\d+)/{KILL_EPOCHS}", text)
    assert (resumed and int(resumed.group(1)) > 1) or "fold 0: finished in an earlier run" in text, text[-3000:]
    assert f"[fold 0] epoch 1/{KILL_EPOCHS} " not in text, text[-3000:]
    card, models = load_fold_models(str(killed["out"]))
    assert len(models) == FOLDS
    # Its history has the resume inside the first run (the worker kill) and, when the second run
    # continued it, a second one at a later epoch.
    final = next(killed["out"].glob("_train/*/done/fold-0/final.json"))
    events = [r["epoch"] for r in json.loads(final.read_text())["history"] if r.get("event") == "resumed"]
    assert events and events[0] > 0, f"fold 0 never resumed from a checkpoint: {events}"
    if resumed:
        assert len(events) >= 2 and events[-1] == int(resumed.group(1)) - 1, events


def test_two_commands_at_once_both_succeed_without_tracebacks(two_runs):
    for rc, out, err in two_runs["runs"]:
        assert rc == 0, err[-4000:]
        assert "Traceback" not in out + err, err[-4000:]
        assert out.startswith("model ") and len(out.splitlines()) == 1, out  # stdout: the result only
    # Each command ran its own local Ray, and Ray Train's helpers in its workers found theirs:
    # no "Found multiple active Ray instances" even in Ray's own log files.
    sessions = sorted((two_runs["ray_tmp"] / "ray").glob("session_2*"))
    assert len(sessions) == 2, sessions
    for s in sessions:
        assert list((s / "logs").glob("cam2seg-driver-*.log")), f"no driver log file in {s}"
        for f in (s / "logs").glob("worker-*.err"):
            assert "Found multiple active Ray instances" not in f.read_text(errors="replace"), f
        # Lean (cam2seg.raycluster.lean_local): Ray Train ran without its preemption watcher actor
        # (a worker's .out file names its actor on an ":actor_name:" line).
        actors = {line for f in (s / "logs").glob("worker-*.out")
                  for line in f.read_text(errors="replace").splitlines()[:3] if line.startswith(":actor_name:")}
        assert ":actor_name:RayTrainWorker" in actors and ":actor_name:PreemptionWatcher" not in actors, actors


def test_every_fold_epoch_line_reaches_the_terminal_and_nothing_from_ray(two_runs):
    (_, kout, kerr), fresh = two_runs["runs"]
    for rc, out, err in two_runs["runs"]:
        assert rc == 0, err[-4000:]
        ray_lines = [line for line in (out + err).splitlines() if RAY_LINE.search(line)]
        assert not ray_lines, "\n".join(ray_lines)
    _, _, err = fresh
    for k in range(FOLDS):
        for e in range(1, EPOCHS + 1):
            # once: neither lost nor merged by Ray's dedup nor shown twice
            assert err.count(f"[fold {k}] epoch {e}/{EPOCHS} ") == 1, err
        assert f"fold {k}: done" in err, err
    # the continued command: each fold's epochs from where it resumed, each once
    for k in range(FOLDS):
        if f"fold {k}: finished in an earlier run" in kerr:
            continue
        m = re.search(rf"\[fold {k}\] resuming at epoch (\d+)/{KILL_EPOCHS}", kerr)
        start = int(m.group(1)) if m else 1
        for e in range(1, KILL_EPOCHS + 1):
            assert kerr.count(f"[fold {k}] epoch {e}/{KILL_EPOCHS} ") == (1 if e >= start else 0), (k, e, kerr)
        assert f"fold {k}: done" in kerr, kerr


def test_object_storage_for_everything_and_two_workers_per_fold(two_runs):
    """The fresh command: archive, Ray Train checkpoints and artifact on S3, DDP in each fold."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cam2seg import io

    rc, _, err = two_runs["runs"][1]
    assert rc == 0, err[-3000:]
    fs = two_runs["fs"]
    bucket_path = S3_MODEL.removeprefix("s3://")
    ckpts = [p for p in fs.find(f"{bucket_path}/_train", withdirs=True) if p.rsplit("/", 1)[-1].startswith("checkpoint_2")]
    assert len({p.split("/runs/")[1].split("/")[1] for p in ckpts}) >= 2 * FOLDS, ckpts
    card, models = load_fold_models(S3_MODEL)
    assert all(f["workers"] == 2 for f in card.metrics["folds"]) and len(models) == FOLDS
    oof = pq.read_table(pa.BufferReader(io.read_bytes(f"{S3_MODEL}/oof.parquet"))).to_pydict()
    assert len(oof["image_id"]) == 24 and len(set(oof["image_id"])) == 24
    assert np.isfinite(np.array(oof["prob_1"])).all()
