"""The label store's commit protocol, without Ray: parts, markers, newest-wins, lease."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
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
    assert store.labeled_ids(root, "v1") == {"a.jpg", "b.jpg"} and store.labeled_ids(root, "v2") == {"b.jpg"}
    assert store.read_errors(root).column("image_id").to_pylist() == ["c.jpg"]
    _run(root, ["c.jpg"])  # labeled later: no longer an error
    assert store.read_errors(root).num_rows == 0
    assert store.remove_uncommitted(root) == 1
    assert len(store.read_masks(root, columns=["area"]).column_names) == 3


def test_marker_row_counts_are_checked(tmp_path):
    root = str(tmp_path / "store")
    run = _run(root, ["a.jpg"])
    marker = tmp_path / "store" / "_runs" / f"{run}.json"
    m = json.loads(marker.read_text())
    m["parts"]["masks"][0]["rows"] = 5
    marker.write_text(json.dumps(m))
    with pytest.raises(store.StoreError, match="its marker says 5"):
        store.read_masks(root)


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    root = str(tmp_path / "store")
    with store.Lease(root, "run-1", settle=0.01):
        with pytest.raises(store.StoreBusy, match="being written by run run-1"):
            store.Lease(root, "run-2", settle=0.01).acquire()
    assert not (tmp_path / "store" / "_lock.json").exists()
    # a holder that died without releasing: its pid is gone on this host
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"run_id": "run-x", "host": os.uname().nodename, "pid": dead.pid, "heartbeat": 1e12}
    (tmp_path / "store" / "_lock.json").write_text(json.dumps(lock))
    with store.Lease(root, "run-3", settle=0.01):
        assert json.loads((tmp_path / "store" / "_lock.json").read_text())["run_id"] == "run-3"
    # a holder on another host that stopped beating
    (tmp_path / "store" / "_lock.json").write_text(json.dumps({**lock, "host": "elsewhere", "heartbeat": 0}))
    store.Lease(root, "run-4", ttl=60, settle=0.01).acquire().release()


def test_unwritable_store_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(store.StoreError, match="cannot write to the label store"):
        store.Lease(str(tmp_path / "file" / "store"), "r").acquire()
