"""The training run's manifest and the loop configs built on it (no Ray)."""

import pickle

import cv2
import numpy as np
import pyarrow as pa
import pytest

from cam2seg import preprocess
from cam2seg.archive import Archive
from cam2seg.config import ClassifierConfig, SegmenterConfig
from cam2seg.folds import make_folds
from cam2seg.train import manifest
from cam2seg.train.classifier_task import ClassifierTask
from cam2seg.train.fold_runner import fold_configs
from cam2seg.train.segmenter_task import SegmenterTask
from cam2seg.train.targets import refine_targets


def _table(n: int, c: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"{i:06d}.jpg" for i in range(n)]
    labels = (rng.random((n, c)) < 0.3).astype(np.uint8)
    rles = [[f"{1 + k} {3 + i % 7}" if labels[i, k] else "" for k in range(c)] for i in range(n)]
    return manifest.manifest_table(ids, [f"s3://bucket/images/{i}" for i in ids], make_folds(labels, 2, 0), labels,
                                   rles, [(64, 400)] * n)


def test_a_fold_reads_the_other_folds_in_run_order_and_its_own_rows(tmp_path):
    table = _table(50)
    url = manifest.write_manifest(str(tmp_path / "m"), table)
    for k in (0, 1):
        train, val = manifest.read_fold(url, k, 2)
        assert train.column("index").to_pylist() == [i for i, f in enumerate(table.column("fold").to_pylist()) if f != k]
        assert set(val.column("fold").to_pylist()) == {k}
        assert train.num_rows + val.num_rows == 50
        rows = {r["image_id"]: r for r in train.to_pylist() + val.to_pylist()}
        assert rows == {r["image_id"]: r for r in table.to_pylist()}


def test_a_complete_manifest_is_kept_and_a_torn_one_rewritten(tmp_path):
    url = str(tmp_path / "m")
    manifest.write_manifest(url, _table(20, seed=0))
    manifest.write_manifest(url, _table(20, seed=1))  # same run key, same folder: kept as it is
    assert manifest.read_fold(url, 0, 2)[1].equals(manifest.fold_rows(url, 0))
    first = manifest.fold_rows(url, 0)
    (tmp_path / "m" / "_complete").unlink()  # a driver killed before the end
    manifest.write_manifest(url, _table(20, seed=1))
    assert not manifest.fold_rows(url, 0).equals(first) and (tmp_path / "m" / "_complete").exists()


def test_digest_follows_rows_not_the_images_location():
    a = _table(30)
    assert manifest.table_digest(a) == manifest.table_digest(_table(30))
    moved = a.set_column(a.schema.get_field_index("uri"), "uri",
                         pa.array([u.replace("s3://bucket", "/data") for u in a.column("uri").to_pylist()]))
    assert manifest.table_digest(moved) == manifest.table_digest(a)
    rles = a.column("rles").to_pylist()
    rles[3] = ["9 9"] + rles[3][1:]
    changed = a.set_column(a.schema.get_field_index("rles"), "rles", pa.array(rles, a.schema.field("rles").type))
    assert manifest.table_digest(changed) != manifest.table_digest(a)


@pytest.mark.parametrize("task, cfg, extra", [
    ("classifier", ClassifierConfig(), {"num_classes": 4}),
    ("segmenter", SegmenterConfig(), {"num_classes": 4, "size": [64, 400], "refine": True}),
])
def test_the_loop_config_does_not_grow_with_the_archive(tmp_path, task, cfg, extra):
    sizes = []
    for n, name in ((100, "a"), (10_000, "b")):
        url = manifest.write_manifest(str(tmp_path / name / "manifest"), _table(n))
        configs = fold_configs(task, cfg, url, 2, [0, 1], extra)
        assert set(configs) == {0, 1} and configs[1]["manifest"] == url
        sizes.append([len(pickle.dumps(configs[k])) for k in (0, 1)])
    assert sizes[0] == sizes[1] and max(sizes[0]) < 4096


def test_the_tasks_decode_manifest_rows_as_the_archive_says(small_archive, tmp_path):
    a = Archive.open(str(small_archive))
    ids = a.image_ids[:24]
    idx = [a.index(i) for i in ids]
    shape = a.image_shape(ids[0])
    table = manifest.manifest_table(ids, [a.image_url(i) for i in ids], np.arange(24) % 2, a.labels[idx],
                                    [[a.rle(i, c) for c in a.class_ids] for i in ids], [shape] * 24)
    size = (32, 200)
    cfg = SegmenterConfig(size=size, ignore_band=1)
    seg = SegmenterTask({"segmenter": cfg.model_dump(mode="json"), "num_classes": 4, "size": list(size),
                         "refine": True})
    x, y = seg.decode(table)
    assert x.shape == (24, *size) and x.dtype == np.uint8 and y.shape == (24, 4, *size) and y.dtype == np.int8
    for j, iid in enumerate(ids):
        assert np.array_equal(x[j], preprocess.prepare(preprocess.load_images([a.image_url(iid)], shape)[0], size))
        masks = np.stack([cv2.resize(m.astype(np.uint8), size[::-1], interpolation=cv2.INTER_NEAREST) > 0
                          for m in a.masks(iid, shape)])
        assert np.array_equal(y[j], refine_targets(masks, a.labels[a.index(iid)], ignore_band=1))
    clf = ClassifierTask({"classifier": ClassifierConfig(size=size).model_dump(mode="json"), "num_classes": 4})
    xc, yc = clf.decode(table)
    assert np.array_equal(xc, x) and np.array_equal(yc, a.labels[idx].astype(np.float32))


def _store_run(root, rows, run_id=None):
    from cam2seg import store

    run_id = run_id or store.new_run_id()
    table = pa.Table.from_pylist([{"image_id": i, "class_id": c, "encoded_pixels": e, "score": 0.5, "area": 1,
                                   "height": 64, "width": 400, "model_version": "v", "run_id": run_id}
                                  for i, c, e in rows], schema=store.MASK_SCHEMA)
    store.commit(root, run_id, {"parts": {"masks": [store.write_part(root, "masks", run_id, table)]}, "complete": True})


def test_store_masks_pivot_to_one_row_per_archive_image(small_archive, tmp_path, log_lines):
    from cam2seg import store
    from cam2seg.train.masks import mask_targets

    a = Archive.open(str(small_archive))
    ids = a.image_ids[:5]
    root = str(tmp_path / "store")
    # image 0 lacks its class-3 row; image 4 is not in the store; "elsewhere.jpg" is not in the archive
    _store_run(root, [(i, c, f"{j + 1} {c}") for j, i in enumerate(ids[:4]) for c in (1, 2, 3, 4)
                      if (j, c) != (0, 3)] + [("elsewhere.jpg", 1, "1 1")])
    _store_run(root, [(ids[1], c, "" if c != 2 else "7 7") for c in (1, 2, 3, 4)])  # a newer run relabels image 1
    with log_lines() as messages:
        rows, source = mask_targets(a, root)
    assert rows.column("image_id").to_pylist()[:4] == ids[:4] and ids[4] not in rows.column("image_id").to_pylist()
    assert "elsewhere.jpg" not in rows.column("image_id").to_pylist()
    got = dict(zip(rows.column("image_id").to_pylist(), rows.column("rles").to_pylist()))
    assert got[ids[0]] == ["1 1", "1 2", "", "1 4"] and got[ids[1]] == ["", "7 7", "", ""]
    assert got[ids[3]] == ["4 1", "4 2", "4 3", "4 4"]
    assert set(rows.column("height").to_pylist()) == {64} and len(source["store_runs"]) == 2
    assert any(f"{len(a) - 4} of {len(a)} archive images have no pseudo-mask" in m for m in messages)
    _store_run(root, [(ids[0], 9, "1 1")])
    with pytest.raises(store.StoreError, match="class 9 is not one of the archive's classes"):
        mask_targets(a, root)


@pytest.mark.parametrize("pivot_images", [16_384, 5])
def test_the_segmenter_manifest_is_written_fold_by_fold_from_the_pinned_runs(small_archive, tmp_path, monkeypatch,
                                                                             pivot_images):
    """The driver's manifest holds no mask string until a fold is written; the store's strings
    are read once for every fold, from the runs read at the start, through a local spill that is
    gone afterwards; the rows equal the whole-table pivot of the same store (also when the pivot
    gathers a few images at a time, as it does past 16,384)."""
    import os

    from cam2seg import store
    from cam2seg.train import masks as masks_module
    from cam2seg.train.masks import FoldMasks, mask_keys, mask_targets, masks_digest

    monkeypatch.setattr(masks_module, "_PIVOT_IMAGES", pivot_images)

    a = Archive.open(str(small_archive))
    root = str(tmp_path / "store")
    _store_run(root, [(i, c, f"{j + 1} {c}") for j, i in enumerate(a.image_ids) for c in (1, 3)])
    _store_run(root, [(a.image_ids[2], 3, "")])  # newer run: image 2's class 3 is empty now
    whole, _ = mask_targets(a, root)
    runs = store.committed_runs(root)
    keys, _ = mask_keys(a, root, runs)
    assert keys.column_names == ["image_id", "height", "width"]
    ids = keys.column("image_id").to_pylist()
    folds = make_folds(a.labels[[a.index(i) for i in ids]], 3, 0)
    table = manifest.manifest_table(ids, [a.image_url(i) for i in ids], folds, a.labels, None,
                                    np.stack([keys.column("height").to_numpy(), keys.column("width").to_numpy()], 1))
    assert "rles" not in table.column_names
    digest = masks_digest(a, root, runs)
    # a rerun that found every image labeled commits a run without parts: the masks are the same
    store.commit(root, store.new_run_id(), {"parts": {"masks": []}, "complete": True})
    assert masks_digest(a, root, store.committed_runs(root)) == digest
    _store_run(root, [(i, 1, "") for i in a.image_ids])  # committed after the runs were read: not in this run
    assert masks_digest(a, root, runs) == digest != masks_digest(a, root, store.committed_runs(root))

    seen, passes = [], []
    fill = FoldMasks(a, root, runs, table)
    real_iter = store.iter_masks
    monkeypatch.setattr(store, "iter_masks", lambda *args, **kw: passes.append(kw) or real_iter(*args, **kw))

    def spy(part):
        seen.append(sorted(set(part.column("fold").to_pylist())))
        spill = None if fill._spill is None else fill._spill.name
        yield from fill(part)
        seen.append(spill if spill is not None else fill._spill.name)

    url = manifest.write_manifest(str(tmp_path / "m"), table, spy)
    assert seen[0::2] == [[0], [1], [2]]
    assert len(passes) == 1 and passes[0]["runs"] == runs  # one pass over the store, at the pinned runs
    assert len(set(seen[1::2])) == 1 and not os.path.exists(seen[1])  # one spill, removed after the last fold
    rows = pa.concat_tables([manifest.fold_rows(url, k) for k in range(3)]).sort_by("index")
    assert rows.column_names == [f.name for f in (*manifest.BASE_SCHEMA, *[pa.field(*c) for c in manifest.MASK_COLUMNS])]
    assert rows.column("image_id").to_pylist() == ids
    assert rows.column("rles").to_pylist() == whole.column("rles").to_pylist()
    got = dict(zip(ids, rows.column("rles").to_pylist()))
    assert got[a.image_ids[2]] == ["3 1", "", "", ""] and got[a.image_ids[0]] == ["1 1", "", "1 3", ""]
    with pytest.raises(ValueError, match="one whole fold"):
        list(fill(table))
    # true masks need no store runs: the archive's own strings, in the same layout
    truth, _ = mask_targets(a, "truth")
    tkeys, _ = mask_keys(a, "truth")
    ttable = manifest.manifest_table(a.image_ids, a.image_ids, np.zeros(len(a), int), a.labels, None,
                                     np.stack([tkeys.column("height").to_numpy(), tkeys.column("width").to_numpy()], 1))
    tpart = pa.concat_tables(FoldMasks(a, "truth", None, ttable)(ttable))
    assert tpart.column("rles").to_pylist() == truth.column("rles").to_pylist()
    assert tpart.column("rles").to_pylist()[0] == [a.rle(a.image_ids[0], c) for c in a.class_ids]


def test_an_unreadable_card_is_trained_over_with_a_warning(tmp_path, log_lines):
    from cam2seg.train.fold_runner import trained_card

    (tmp_path / "model.json").write_text("{not json")
    with log_lines() as messages:
        assert trained_card(str(tmp_path), "abc", force=False) is None
    assert any("training afresh and writing over it" in m for m in messages)
    assert trained_card(str(tmp_path / "none"), "abc", force=False) is None


def test_checkpoints_ray_train_lost_track_of_are_found_newest_first(tmp_path, log_lines):
    """A command killed while Ray Train rewrote a run's state file leaves it empty, and Ray Train
    then refuses the run on every later try: the state file is moved aside and the fold resumes
    from its newest checkpoint folder whose state file reads."""
    from cam2seg.train.fold_runner import orphaned_checkpoints, run_url

    run = tmp_path / "work" / "runs" / "fold-0"
    for name, state in [("checkpoint_2026-12-02_03-00-00.000001", '{"epoch": 0}'),
                        ("checkpoint_2026-12-02_03-00-01.000001", '{"epoch": 1}'),
                        ("checkpoint_2026-12-02_03-00-02.000001", '{"epo'),  # cut short
                        ("checkpoint_2026-12-02_03-00-03.000001", None)]:  # its files not all there
        (run / name).mkdir(parents=True)
        if state is not None:
            (run / name / "state.json").write_text(state)
    work = str(tmp_path / "work")
    assert run_url(work, 0) == str(run)
    (run / "checkpoint_manager_snapshot.json").write_text('{"checkpoints": []}')
    assert orphaned_checkpoints(work, 0) == []  # Ray Train resumes it itself
    (run / "checkpoint_manager_snapshot.json").write_text("")
    with log_lines() as messages:
        found = orphaned_checkpoints(work, 0)
    assert found == [str(run / "checkpoint_2026-12-02_03-00-01.000001"), str(run / "checkpoint_2026-12-02_03-00-00.000001")]
    assert not (run / "checkpoint_manager_snapshot.json").exists()
    assert [p.read_text() for p in run.glob("checkpoint_manager_snapshot.json.unreadable-*")] == [""]
    assert any("is unreadable" in m and "moved it aside" in m for m in messages), messages
    assert orphaned_checkpoints(work, 0) == found  # no state file at all: the same folders
    assert orphaned_checkpoints(work, 1) == []  # a fold that never ran
