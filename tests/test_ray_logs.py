"""What a person sees while cam2seg runs on Ray: its own lines, every fold's epoch lines, and
nothing of Ray's; and two commands at once on one machine, each with its own local Ray.

Two real ``cam2seg train-classifiers`` commands (2 folds, 2 epochs, 32x200) run at the same time
in subprocesses sharing one Ray temp folder (as two commands share ``/tmp/ray``), each starting
its own local Ray. One pair of runs serves all tests here: on 2 CPU cores it takes about a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cam2seg.synthetic import synth

from conftest import stop_process

pytestmark = pytest.mark.slow

CAM2SEG = str(Path(sys.executable).parent / "cam2seg")
EPOCHS, FOLDS = 2, 2
CONFIG = f"""classifier:
  encoder: mobilenetv3_small_050
  folds: {FOLDS}
  epochs: {EPOCHS}
  size: [32, 200]
  batch_size: 8
  swa_epochs: 1
  load_threads: 1
"""

# Lines that come from Ray, not from cam2seg: Ray's Python log format, its C++ log format, the
# "(ActorName pid=...)" / "(raylet)" prefixes of forwarded output, its log dedup note.
RAY_LINE = re.compile(
    r"placement_group_cleaner|core_worker|PreemptionWatcher|\(raylet\)|\((\w+ )?pid=\d+|"
    r"repeated \d+x across cluster|^\S+ \S+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ --|"
    r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\]|^(WARNING|ERROR)\b|Traceback")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Both commands' (returncode, stdout, stderr), and the Ray temp folder they shared."""
    root = tmp_path_factory.mktemp("ray-logs")
    (root / "c.yaml").write_text(CONFIG)
    ray_tmp = tempfile.mkdtemp(prefix="c2s-rl-")  # short: Ray's socket paths live under it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    procs = []
    try:
        for i in (1, 2):
            data = root / f"archive{i}"
            synth.write_archive(str(data), images=24, height=32, width=200, seed=i, mix="balanced", progress=None)
            cmd = [CAM2SEG, "train-classifiers", "--data", str(data), "--out", str(root / f"model{i}"),
                   "--config", str(root / "c.yaml")]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                          start_new_session=True))
        t0 = time.perf_counter()
        outs = [p.communicate(timeout=400) for p in procs]
        print(f"two train-classifiers at once: {time.perf_counter() - t0:.0f}s")
        yield {"runs": [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)], "ray_tmp": Path(ray_tmp)}
    finally:
        for p in procs:  # the commands, then whatever is left of their process groups (Ray's)
            stop_process(p, 30, group=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


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


def test_every_fold_epoch_line_reaches_the_terminal_and_nothing_from_ray(two_runs):
    for rc, out, err in two_runs["runs"]:
        assert rc == 0, err[-4000:]
        for k in range(FOLDS):
            for e in range(1, EPOCHS + 1):
                # once: neither lost nor merged by Ray's dedup nor shown twice
                assert err.count(f"[fold {k}] epoch {e}/{EPOCHS} ") == 1, err
            assert f"fold {k}: done" in err, err
        ray_lines = [line for line in (out + err).splitlines() if RAY_LINE.search(line)]
        assert not ray_lines, "\n".join(ray_lines)
