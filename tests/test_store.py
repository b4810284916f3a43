"""The label store's commit protocol, without Ray: parts, markers, newest-wins, lease."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cam2seg import rle, store


def _masks(ids, run_id, version="v1", fill=1):
    rows = []
    for i in ids:
        for c in (1, 2, 3, 4):
            m = np.zeros((4, 6), bool)
            m[:fill, :c] = True
            rows.append({"image_id": i, "class_id": c, "encoded_pixels": rle.encode(m), "score": 0.5,
                         "area": int(m.sum()), "height": 4, "width": 6, "model_version": version, "run_id": run_id})
    return pa.Table.from_pylist(rows, schema=store.MASK_SCHEMA)


def _run(root, ids, version="v1", fill=1, commit=True, errors=()):
    run = store.new_run_id()
    parts = {"masks": [store.write_part(root, "masks", run, _masks(ids, run, version, fill))], "errors": []}
    if errors:
        t = pa.Table.from_pylist([{"image_id": e, "uri": f"x/{e}", "error": "bad", "run_id": run} for e in errors],
                                 schema=store.ERROR_SCHEMA)
        parts["errors"].append(store.write_part(root, "errors", run, t))
    if commit:
        store.commit(root, run, {"parts": parts, "model_version": version, "complete": True})
    return run


def test_only_committed_parts_count_and_the_newest_run_wins(tmp_path):
    root = str(tmp_path / "store")
    assert store.read_masks(root).num_rows == 0
    _run(root, ["a.jpg", "b.jpg"], fill=1, errors=["c.jpg"])
    _run(root, ["b.jpg"], fill=3, version="v2")
    _run(root, ["a.jpg", "z.jpg"], fill=2, commit=False)  # a crashed run: invisible
    t = store.read_masks(root)
    assert t.num_rows == 8 and t.schema.names == store.MASK_SCHEMA.names
    pairs = list(zip(t.column("image_id").to_pylist(), t.column("class_id").to_pylist()))
    assert len(set(pairs)) == 8 and "z.jpg" not in t.column("image_id").to_pylist()
    rows = {(r["image_id"], r["class_id"]): r for r in t.to_pylist()}
    assert rows[("b.jpg", 2)]["model_version"] == "v2" and store.decode_mask(rows[("b.jpg", 2)]).sum() == 6
    assert rows[("a.jpg", 2)]["model_version"] == "v1" and store.decode_mask(rows[("a.jpg", 2)]).sum() == 2
    assert store.labeled_ids(root, "v1").to_pylist() == ["a.jpg", "b.jpg"]
    assert store.labeled_ids(root, "v2").to_pylist() == ["b.jpg"] and len(store.labeled_ids(root, None)) == 2
    assert store.read_errors(root).column("image_id").to_pylist() == ["c.jpg"]
    _run(root, ["c.jpg"])  # labeled later: no longer an error
    assert store.read_errors(root).num_rows == 0
    assert store.remove_uncommitted(root) == 1
    assert len(store.read_masks(root, columns=["area"]).column_names) == 3


def test_streamed_rows_are_read_masks_rows_in_any_batch_size(tmp_path):
    root = str(tmp_path / "store")
    _run(root, [f"{i:03d}.jpg" for i in range(30)], fill=1)
    _run(root, [f"{i:03d}.jpg" for i in range(10, 40)], fill=2, version="v2")  # supersedes 10-29
    _run(root, ["005.jpg"], fill=3, version="v3")
    whole = store.read_masks(root)
    assert whole.num_rows == 40 * 4
    for batch_rows in (1, 7, 1000):
        batches = list(store.iter_masks(root, batch_rows=batch_rows))
        assert all(b.num_rows <= batch_rows for b in batches)
        streamed = pa.Table.from_batches(batches).sort_by([("image_id", "ascending"), ("class_id", "ascending")])
        assert streamed.equals(whole)
    versions = dict(zip(whole.column("image_id").to_pylist(), whole.column("model_version").to_pylist()))
    assert versions["000.jpg"] == "v1" and versions["005.jpg"] == "v3" and versions["010.jpg"] == "v2"
    keys = store.read_masks(root, columns=["area"])
    assert keys.column_names == ["area", "image_id", "class_id"] and keys.num_rows == 160
    with pytest.raises(ValueError, match="no such store column"):
        store.read_masks(root, columns=["pixels"])
    assert list(store.iter_masks(str(tmp_path / "empty"))) == []
    some = store.read_masks(root, image_ids=["005.jpg", "020.jpg", "nope.jpg"])
    assert some.equals(whole.filter(pc.is_in(whole.column("image_id"), pa.array(["005.jpg", "020.jpg"]))))


def test_newest_row_positions_read_the_same_rows_from_pinned_runs(tmp_path):
    """newest_rows numbers each (image, class)'s newest row once; iter_masks(rows=...) reads those
    rows (or any subset, in any order) and iter_masks(runs=...) reads the runs it was given, not
    one committed after them."""
    root = str(tmp_path / "store")
    _run(root, [f"{i:03d}.jpg" for i in range(12)], fill=1)
    _run(root, [f"{i:03d}.jpg" for i in range(6, 9)], fill=2, version="v2")
    runs = store.committed_runs(root)
    keys = store.newest_rows(root, runs)
    assert keys.column_names == ["image_id", "class_id", "row"] and keys.num_rows == 12 * 4
    assert len(set(keys.column("row").to_pylist())) == 48 and max(keys.column("row").to_pylist()) < 12 * 4 + 3 * 4
    _run(root, ["000.jpg"], fill=3, version="v3")  # committed after the runs were read
    pinned = store.read_masks(root, runs=runs)
    assert pinned.filter(pc.equal(pinned.column("image_id"), "000.jpg")).column("model_version")[0].as_py() == "v1"
    assert store.read_masks(root).filter(pc.equal(store.read_masks(root).column("image_id"), "000.jpg")) \
        .column("model_version")[0].as_py() == "v3"
    some = keys.filter(pc.is_in(keys.column("image_id"), pa.array(["007.jpg", "001.jpg"])))
    rows = some.column("row").to_numpy()[::-1].copy()  # any order
    got = pa.Table.from_batches(list(store.iter_masks(root, runs=runs, rows=rows)))
    want = pinned.filter(pc.is_in(pinned.column("image_id"), pa.array(["001.jpg", "007.jpg"])))
    assert got.sort_by([("image_id", "ascending"), ("class_id", "ascending")]).equals(want)
    assert set(got.column("model_version").to_pylist()) == {"v1", "v2"}
    assert store.newest_rows(root, runs, ["007.jpg", "nope.jpg"]).num_rows == 4
    with pytest.raises(ValueError, match="image_ids or rows"):
        list(store.iter_masks(root, image_ids=["001.jpg"], rows=rows))
    with pytest.raises(ValueError, match="positions in 0..59"):
        list(store.iter_masks(root, runs=runs, rows=[60]))
    assert store.newest_rows(str(tmp_path / "empty")).num_rows == 0


def test_finish_refuses_rows_that_do_not_add_up(tmp_path):
    root = str(tmp_path / "store")
    for todo, written in ((["a.jpg", "b.jpg"], ["a.jpg", "a.jpg"]),  # a duplicate, and b missing
                          (["a.jpg"], ["b.jpg"])):  # a foreign image
        marker = store.RunMarker(run_id=store.new_run_id())
        with store.RunWriter(root, marker, commit_every=100) as w:
            part = store.write_part(root, "masks", marker.run_id, _masks(written, marker.run_id))
            w.add(store.Part(**part), None, len(todo), 0)
            with pytest.raises(RuntimeError, match="do not reconcile"):
                w.finish(todo, [1, 1, 1, 1])
    assert store.committed_runs(root) == []


def test_marker_row_counts_are_checked(tmp_path):
    root = str(tmp_path / "store")
    run = _run(root, ["a.jpg"])
    marker = tmp_path / "store" / "_runs" / f"{run}.json"
    m = json.loads(marker.read_text())
    m["parts"]["masks"][0]["rows"] = 5
    marker.write_text(json.dumps(m))
    with pytest.raises(store.StoreError, match="its marker says 5"):
        store.read_masks(root)


def _lock(tmp_path):
    return json.loads((tmp_path / "store" / "_lock.json").read_text())


def _write_lock(tmp_path, **lock):
    (tmp_path / "store").mkdir(exist_ok=True)
    (tmp_path / "store" / "_lock.json").write_text(json.dumps(lock))


@pytest.fixture
def sleeper():
    """A live process on this host, stopped by its pid at the end."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait(10)


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    root = str(tmp_path / "store")
    with store.Lease(root, "run-1", settle=0.01):
        with pytest.raises(store.StoreBusy, match="being written by run run-1"):
            store.Lease(root, "run-2", settle=0.01).acquire()
        assert _lock(tmp_path)["run_id"] == "run-1"
    assert not (tmp_path / "store" / "_lock.json").exists()
    # a holder that died without releasing: its pid is gone on this host
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, run_id="run-x", host=socket.gethostname(), pid=dead.pid, heartbeat=time.time(), ttl=600)
    with store.Lease(root, "run-3", settle=0.01):
        assert _lock(tmp_path)["run_id"] == "run-3"
    assert not (tmp_path / "store" / "_lock.json").exists()


def test_stale_lease_of_another_host_is_taken_over_by_its_own_ttl(tmp_path):
    root = str(tmp_path / "store")
    # heartbeat 100 s old, its holder's ttl 30 s: stale, although the newcomer's ttl is 600 s
    _write_lock(tmp_path, run_id="run-x", host="elsewhere.invalid", pid=1, heartbeat=time.time() - 100, ttl=30)
    with store.Lease(root, "run-new", ttl=600, settle=0.01):
        lock = _lock(tmp_path)
        assert lock["run_id"] == "run-new" and lock["ttl"] == 600 and lock["host"] == socket.gethostname()


def test_a_shorter_ttl_of_the_newcomer_does_not_make_a_fresh_lease_stale(tmp_path):
    root = str(tmp_path / "store")
    _write_lock(tmp_path, run_id="run-x", host="elsewhere.invalid", pid=1, heartbeat=time.time() - 100, ttl=600)
    with pytest.raises(store.StoreBusy, match="being written by run run-x"):
        store.Lease(root, "run-new", ttl=5, settle=0.01).acquire()
    assert _lock(tmp_path)["run_id"] == "run-x"


def test_a_live_pid_on_this_host_is_never_taken(tmp_path, sleeper):
    root = str(tmp_path / "store")
    # no heartbeat for ages and a tiny ttl on both sides: the holder still lives here
    _write_lock(tmp_path, run_id="run-x", host=socket.gethostname(), pid=sleeper.pid, heartbeat=0, ttl=0.01)
    with pytest.raises(store.StoreBusy, match="being written by run run-x"):
        store.Lease(root, "run-new", ttl=0.01, settle=0.01).acquire()
    assert _lock(tmp_path)["run_id"] == "run-x"
    with pytest.raises(store.StoreBusy):
        store.remove_uncommitted(root, lease=store.Lease(root, "run-new", ttl=0.01))  # never acquired


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times need /proc")
def test_a_reused_pid_on_this_host_does_not_pass_for_the_holder(tmp_path, sleeper):
    root = str(tmp_path / "store")
    # the holder's pid is alive, but as a process started at another time (a restarted container)
    _write_lock(tmp_path, run_id="run-x", host=socket.gethostname(), pid=sleeper.pid, started="1",
                heartbeat=time.time(), ttl=600)
    with store.Lease(root, "run-new", settle=0.01):
        assert _lock(tmp_path)["run_id"] == "run-new"


def test_heartbeat_refreshes_the_lock_with_the_holders_ttl(tmp_path):
    root = str(tmp_path / "store")
    with store.Lease(root, "run-1", ttl=0.4, settle=0.01):
        first = _lock(tmp_path)
        assert first["ttl"] == 0.4 and first["pid"] == os.getpid()
        deadline = time.time() + 5
        while time.time() < deadline and _lock(tmp_path)["heartbeat"] <= first["heartbeat"]:
            time.sleep(0.05)
        later = _lock(tmp_path)
        assert later["heartbeat"] > first["heartbeat"] and later["run_id"] == "run-1"


def test_after_a_takeover_the_old_holder_neither_beats_nor_commits(tmp_path):
    root = str(tmp_path / "store")
    marker = store.RunMarker(run_id=store.new_run_id())
    with store.RunWriter(root, marker, commit_every=1, lease_ttl=0.4) as w:
        w.lease.settle = 0.01
        part = store.write_part(root, "masks", marker.run_id, _masks(["a.jpg"], marker.run_id))
        # the old holder was paused past its ttl; a run on another host took the store over
        successor = dict(run_id="run-b", host="elsewhere.invalid", pid=1, heartbeat=time.time(), ttl=600)
        _write_lock(tmp_path, **successor)
        time.sleep(0.8)  # eight of the old holder's beats (every 0.1 s)
        assert _lock(tmp_path) == successor, "the old holder's heartbeat overwrote its successor's lock"
        assert w.lease.lost
        with pytest.raises(store.StoreBusy, match="lease lost to run run-b"):
            w.add(store.Part(**part), None, 1, 0)
        with pytest.raises(store.StoreBusy, match="lease lost to run run-b"):
            w.finish(["a.jpg"], [1, 1, 1, 1])
    assert store.committed_runs(root) == []
    assert _lock(tmp_path) == successor  # releasing does not remove the successor's lock


def test_a_rerun_leaves_only_files_some_marker_lists(tmp_path):
    root = str(tmp_path / "store")
    # a crashed run: one committed part, uncommitted masks and errors, a stray temp file, its lock
    crashed = _run(root, ["a.jpg"], commit=False, errors=["e.jpg"])
    first = store.write_part(root, "masks", crashed, _masks(["b.jpg"], crashed))
    store.commit(root, crashed, {"parts": {"masks": [first]}, "labeled": 1})
    (tmp_path / "store" / "masks" / f"run={crashed}" / ".part-x.parquet.1234.tmp").write_bytes(b"torn")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, run_id=crashed, host=socket.gethostname(), pid=dead.pid, heartbeat=time.time(), ttl=600)

    marker = store.RunMarker(run_id=store.new_run_id())
    with store.RunWriter(root, marker, commit_every=1) as w:
        assert w.removed == 3
        # a late write of the crashed run (one of its workers still flushing) after the cleanup
        store.write_part(root, "masks", crashed, _masks(["late.jpg"], crashed))
        part = store.write_part(root, "masks", marker.run_id, _masks(["a.jpg", "c.jpg"], marker.run_id))
        assert w.add(store.Part(**part), None, 2, 0)
        w.finish(["a.jpg", "c.jpg"], [2, 2, 2, 2])
    listed = {p.file for m in store.committed_runs(root) for p in (*m.parts.masks, *m.parts.errors)}
    files = {str(f.relative_to(tmp_path / "store")) for kind in ("masks", "errors")
             for f in (tmp_path / "store" / kind).rglob("*") if f.is_file()}
    assert files and files == listed
    assert set(store.read_masks(root).column("image_id").to_pylist()) == {"a.jpg", "b.jpg", "c.jpg"}


def test_unwritable_store_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(store.StoreError, match="cannot write to the label store"):
        store.Lease(str(tmp_path / "file" / "store"), "r").acquire()
