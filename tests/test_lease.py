"""Two real processes on one store (issue 16, item 2): a newcomer with a shorter lease ttl must
not take over a live run's lease, nor delete its uncommitted parts."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from cam2seg import store

# process A: holds a RunWriter with ttl 600, writes one part, says so, waits for "go", commits
HOLDER = textwrap.dedent("""
    import os, sys, time
    import numpy as np, pyarrow as pa
    from cam2seg import rle, store
    root, ready, go = sys.argv[1:4]
    marker = store.RunMarker(run_id=store.new_run_id())
    with store.RunWriter(root, marker, commit_every=10**9, lease_ttl=600) as w:
        rows = []
        for i in ("a.jpg", "b.jpg"):
            for c in (1, 2, 3, 4):
                m = np.zeros((4, 6), bool)
                m[:1, :c] = True
                rows.append({"image_id": i, "class_id": c, "encoded_pixels": rle.encode(m), "score": 0.5,
                             "area": int(m.sum()), "height": 4, "width": 6, "model_version": "v1",
                             "run_id": marker.run_id})
        part = store.write_part(root, "masks", marker.run_id, pa.Table.from_pylist(rows, schema=store.MASK_SCHEMA))
        with open(ready, "w") as f:
            f.write(part["file"])
        deadline = time.time() + 60
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.05)
        w.add(store.Part(**part), None, 2, 0)
        w.finish(["a.jpg", "b.jpg"], [2, 2, 2, 2])
""")


def _wait(cond, seconds, what, proc):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return
        assert proc.poll() is None, f"process A ended early: {proc.communicate(timeout=10)[1][-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"{what} within {seconds} s")


def test_a_shorter_ttl_does_not_take_a_live_runs_lease_or_parts(tmp_path):
    root = tmp_path / "store"
    ready, go = tmp_path / "ready", tmp_path / "go"
    a = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(ready), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(ready.exists, 60, "no part from process A", a)
        part = root / ready.read_text()
        assert part.exists()
        lock = json.loads((root / "_lock.json").read_text())
        assert lock["pid"] == a.pid
        # A's heartbeat comes every 150 s: let it age past B's ttl, as a slow first part does
        _wait(lambda: time.time() - json.loads((root / "_lock.json").read_text())["heartbeat"] > 5.5,
              10, "the heartbeat did not age", a)
        b = store.RunMarker(run_id=store.new_run_id())
        with pytest.raises(store.StoreBusy, match=f"being written by run {lock['run_id']}"):
            with store.RunWriter(str(root), b, commit_every=1, lease_ttl=5):
                pass
        assert part.exists(), "process B deleted the running run's part"
        assert json.loads((root / "_lock.json").read_text())["run_id"] == lock["run_id"]

        go.write_text("")
        out, err = a.communicate(timeout=60)
        assert a.returncode == 0, err[-3000:]
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(10)
    runs = store.committed_runs(str(root))
    assert [r.run_id for r in runs] == [lock["run_id"]] and runs[0].complete
    t = store.read_masks(str(root))
    assert t.num_rows == 8 and set(t.column("image_id").to_pylist()) == {"a.jpg", "b.jpg"}
    assert not (root / "_lock.json").exists()


def test_remove_uncommitted_needs_the_lease_and_stops_when_it_is_lost(tmp_path):
    root = str(tmp_path / "store")
    with store.Lease(root, "run-a", settle=0.01) as holder:
        table = store.read_masks(root)  # an empty table of the mask schema
        leftover = tmp_path / "store" / store.write_part(root, "masks", "crashed", table)["file"]
        with pytest.raises(store.StoreBusy, match="does not hold the lease"):
            store.remove_uncommitted(root, lease=store.Lease(root, "run-b"))
        assert leftover.exists()
        # another run takes the lock: the holder's lease is lost and it may delete nothing
        (tmp_path / "store" / "_lock.json").write_text(json.dumps(
            {"run_id": "run-b", "host": "elsewhere.invalid", "pid": 1, "heartbeat": time.time(), "ttl": 600}))
        with pytest.raises(store.StoreBusy, match="lease lost to run run-b"):
            store.remove_uncommitted(root, lease=holder)
        assert leftover.exists()
    assert json.loads((tmp_path / "store" / "_lock.json").read_text())["run_id"] == "run-b"
