"""Mixed supervision: true masks where a masks file covers an image, refined pseudo-masks elsewhere
(cam2seg/train/masks.py with_true_masks, cam2seg/train/decode.py, cam2seg/train/manifest.py),
and evaluation on the covered images only (cam2seg/truemasks.py covered_archive)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cam2seg import rle
from cam2seg.archive import Archive
from cam2seg.config import SegmenterConfig
from cam2seg.train.masks import mask_targets, with_true_masks
from cam2seg.train import manifest
from cam2seg.train.decode import segmenter_rows
from cam2seg.train.targets import IGNORE, build_targets
from cam2seg.truemasks import covered_archive, masks_csv, read_true_masks
from conftest import commit_rows


def _pseudo_store(root: str, arch: Archive, skip: str) -> None:
    """Pseudo-masks for every image but ``skip``: each true mask's bounding box (a CAM-like blob),
    plus a spurious blob on class 4 of every image (the labels must gate it)."""
    rows = []
    for image_id in arch.image_ids:
        if image_id == skip:
            continue
        masks = arch.masks(image_id, (64, 400))
        for k, c in enumerate(arch.class_ids):
            m = np.zeros((64, 400), bool)
            if masks[k].any():
                r, q = np.flatnonzero(masks[k].any(1)), np.flatnonzero(masks[k].any(0))
                m[r[0] : r[-1] + 1, q[0] : q[-1] + 1] = True
            if c == 4:
                m[5:15, 5:60] = True
            rows.append({"image_id": image_id, "class_id": c, "encoded_pixels": rle.encode(m), "score": 0.7,
                         "area": int(m.sum()), "height": 64, "width": 400, "model_version": "m-1", "run_id": ""})
    commit_rows(root, rows)


@pytest.fixture(scope="module")
def mixed(small_archive, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    arch = Archive.open(str(small_archive))
    defective = [i for i, d in zip(arch.image_ids, arch.defective) if d]
    clean = [i for i, d in zip(arch.image_ids, arch.defective) if not d]
    covered = defective[:3] + clean[:1]  # the first defective image has no pseudo-mask at all
    _pseudo_store(str(tmp / "store"), arch, skip=defective[0])
    masks = {i: {c: arch.rle(i, c) for c in arch.class_ids if arch.rle(i, c)} for i in covered}
    (tmp / "reviewed.csv").write_text(masks_csv(masks, arch.class_ids))
    tm = read_true_masks(str(tmp / "reviewed.csv"), arch)
    rows, _ = mask_targets(arch, str(tmp / "store"))
    return {"arch": arch, "tm": tm, "covered": covered, "pseudo": rows, "mixed": with_true_masks(arch, rows, tm),
            "store": str(tmp / "store")}


def test_covered_images_take_their_true_masks(mixed):
    arch, rows, pseudo, covered = mixed["arch"], mixed["mixed"], mixed["pseudo"], mixed["covered"]
    ids = rows.column("image_id").to_pylist()
    assert ids == arch.image_ids  # the image without a pseudo-mask is back, in archive order
    assert pseudo.num_rows == len(arch) - 1
    true = dict(zip(ids, rows.column("true").to_pylist()))
    assert {i for i, t in true.items() if t} == set(covered)
    by_id = dict(zip(ids, rows.column("rles").to_pylist()))
    pseudo_by_id = dict(zip(pseudo.column("image_id").to_pylist(), pseudo.column("rles").to_pylist()))
    for i in ids:
        want = [arch.rle(i, c) for c in arch.class_ids] if true[i] else pseudo_by_id[i]
        assert by_id[i] == want, i


def test_mixed_targets_true_masks_as_they_are_pseudo_masks_refined(mixed):
    arch, rows = mixed["arch"], mixed["mixed"]
    labels = arch.labels[[arch.index(i) for i in rows.column("image_id").to_pylist()]]
    table = manifest.manifest_table(rows.column("image_id").to_pylist(),
                                    [arch.image_url(i) for i in rows.column("image_id").to_pylist()],
                                    np.arange(rows.num_rows) % 2, labels, rows.column("rles"),
                                    np.stack([rows.column("height").to_numpy(), rows.column("width").to_numpy()], 1),
                                    true=rows.column("true").to_numpy(zero_copy_only=False), repeat=3)
    cfg = SegmenterConfig(size=(64, 400), load_threads=1)
    config = {"segmenter": cfg.model_dump(mode="json"), "num_classes": 4, "size": [64, 400], "refine": True}
    _, y = segmenter_rows(table, config)
    true = table.column("true").to_pylist()
    for n, image_id in enumerate(table.column("image_id").to_pylist()):
        if true[n]:
            # a true-mask image's target is its true mask: no ignore band, no label gating
            assert np.array_equal(y[n], arch.masks(image_id, (64, 400)).astype(np.int8)), image_id
        else:
            want = build_targets([table.column("rles")[n].as_py()], [(64, 400)], (64, 400), [labels[n]], cfg)[0]
            assert np.array_equal(y[n], want), image_id
    # the refinements did act on pseudo rows: the spurious class-4 blob is gated where the label
    # says absent, and mask edges are ignored
    gated = [n for n in range(len(true)) if not true[n] and not labels[n][3]]
    assert gated and all(table.column("rles")[n].as_py()[3] and y[n][3].max() == 0 for n in gated)
    assert any((y[n] == IGNORE).any() for n in range(len(true)) if not true[n])
    assert not any((y[n] == IGNORE).any() for n in range(len(true)) if true[n])
    # training rows: a true-mask row is read `repeat` times per epoch, validation once
    train = manifest.training_rows(table)
    assert train.num_rows == table.num_rows + 2 * sum(true)
    assert manifest.training_count(table, np.ones(table.num_rows, bool)) == train.num_rows
    ids = train.column("image_id").to_pylist()
    assert all(ids.count(i) == (3 if t else 1) for i, t in zip(table.column("image_id").to_pylist(), true))


def test_mixed_manifest_written_fold_by_fold_equals_the_whole_table(mixed, tmp_path, monkeypatch):
    """Also when the pivot gathers 3 images at a time: true-mask rows land in several chunks."""
    from cam2seg import store
    from cam2seg.train import masks as masks_module
    from cam2seg.train.masks import FoldMasks, mask_keys

    monkeypatch.setattr(masks_module, "_PIVOT_IMAGES", 3)

    arch, tm, whole = mixed["arch"], mixed["tm"], mixed["mixed"]
    root = mixed["store"]
    runs = store.committed_runs(root)
    keys, _ = mask_keys(arch, root, runs)
    keys = with_true_masks(arch, keys, tm)
    assert "rles" not in keys.column_names
    assert keys.column("image_id").to_pylist() == whole.column("image_id").to_pylist()
    assert keys.column("true").to_pylist() == whole.column("true").to_pylist()
    ids = keys.column("image_id").to_pylist()
    true = keys.column("true").to_numpy(zero_copy_only=False)
    table = manifest.manifest_table(ids, ids, np.arange(len(ids)) % 3, arch.labels[[arch.index(i) for i in ids]],
                                    None, np.stack([keys.column("height").to_numpy(),
                                                    keys.column("width").to_numpy()], 1), true=true, repeat=2)
    url = manifest.write_manifest(str(tmp_path / "m"), table, FoldMasks(arch, root, runs, table, tm))
    rows = pa.concat_tables([manifest.fold_rows(url, k) for k in range(3)]).sort_by("index")
    assert rows.column("rles").to_pylist() == whole.column("rles").to_pylist()
    assert rows.column_names[-3:] == ["rles", "true", "repeat"]


def test_covered_archive_scores_the_covered_images_only(mixed):
    arch, tm, covered = mixed["arch"], mixed["tm"], mixed["covered"]
    sub = covered_archive(arch, tm)
    assert sub.image_ids == sorted(covered) and sub.has_masks and len(sub) == 4
    assert (sub.labels == arch.labels[[arch.index(i) for i in sub.image_ids]]).all()
    assert (sub.true_areas() == arch.true_areas()[[arch.index(i) for i in sub.image_ids]]).all()
    for i in sub.image_ids:
        assert np.array_equal(sub.masks(i, (64, 400)), arch.masks(i, (64, 400)))
        assert sub.image_url(i) == arch.image_url(i)
    with pytest.raises(KeyError):
        sub.index(next(i for i in arch.image_ids if i not in covered))
