"""import-coco: reviewed COCO files back into true masks (cam2seg/review/coco_import.py), the masks
file they become (cam2seg/truemasks.py), and the round trip through our own export."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cam2seg import rle
from cam2seg.archive import Archive, ArchiveError
from cam2seg.review import coco
from cam2seg.review.coco_import import CocoError, import_coco, parse_coco, string_counts
from cam2seg.truemasks import masks_csv, read_true_masks
from conftest import commit_rows, run_cli

H, W = 8, 10
IDS = ["a.png", "b.png", "sub/c.png"]


def _doc(annotations, images=None, categories=None, info=None):
    images = images if images is not None else [{"id": i + 1, "file_name": n, "height": H, "width": W}
                                                for i, n in enumerate(IDS)]
    categories = categories if categories is not None else [{"id": c, "name": f"class {c}"} for c in (1, 2, 3, 4)]
    return {"images": images, "annotations": annotations, "categories": categories, **({"info": info} if info else {})}


def _parse(doc, **kw):
    return parse_coco(doc, IDS, [1, 2, 3, 4], {i: (H, W) for i in IDS}.__getitem__, **kw)


def test_polygons_and_both_rle_forms_become_masks():
    box = np.zeros((H, W), bool)
    box[2:5, 3:7] = True  # rows 2-4, columns 3-6: a pixel-edge outline [3, 2] .. [7, 5]
    dot = np.zeros((H, W), bool)
    dot[7, 9] = True
    from pycocotools import mask as coco_mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = coco_mask.encode(np.asfortranarray(dot.astype(np.uint8)))["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 2, "segmentation": [[3, 2, 7, 2, 7, 5, 3, 5]], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": coco.mask_to_coco_rle(dot), "iscrowd": 1},
        {"id": 7, "image_id": 3, "category_id": 4, "segmentation": {"size": [H, W], "counts": compressed}},
    ]
    got = _parse(_doc(anns))
    assert sorted(got["masks"]) == ["a.png", "sub/c.png"] and got["annotations"] == 3
    assert (got["masks"]["a.png"][2] == (box | dot)).all()  # two annotations of one class: unioned
    assert list(got["masks"]["a.png"]) == [2] and (got["masks"]["sub/c.png"][4] == dot).all()
    # b.png has no annotation and the file does not say it was reviewed: left out
    assert got["skipped"] == ["b.png"] and got["clean"] == []
    assert _parse(_doc(anns), unannotated="clean")["clean"] == ["b.png"]
    assert _parse(_doc(anns, info={"cam2seg_reviewed": "all"}))["clean"] == ["b.png"]
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png", "cam2seg_reviewed": True}]
    assert _parse(_doc([], images=images)) == {"masks": {}, "clean": ["b.png"], "skipped": ["a.png"], "annotations": 0}


def test_file_names_and_categories_are_matched():
    images = [{"id": 10, "file_name": "train_images/a.png"}, {"id": 11, "file_name": "/data/export/c.png"}]
    cats = [{"id": 5, "name": "scratch"}, {"id": 6, "name": "Class_3"}]
    square = [[0, 0, 2, 0, 2, 2, 0, 2]]
    anns = [{"id": 1, "image_id": 10, "category_id": 5, "segmentation": square},
            {"id": 2, "image_id": 11, "category_id": 6, "segmentation": square}]
    with pytest.raises(CocoError, match=r"annotation 1: category 5 \('scratch'\) is not one of the classes"):
        _parse(_doc(anns, images=images, categories=cats))
    got = _parse(_doc(anns, images=images, categories=cats), categories={"scratch": 1})
    assert sorted((i, list(m)) for i, m in got["masks"].items()) == [("a.png", [1]), ("sub/c.png", [3])]
    assert _parse(_doc(anns, images=images, categories=cats), categories={"5": 2})["masks"]["a.png"].keys() == {2}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(category_id=9), "annotation 1: category 9 is not in the file's categories"),
    (lambda d: d["images"][0].update(file_name="elsewhere.png"), "annotation 1: image 'elsewhere.png' is not in the archive"),
    (lambda d: d["annotations"][0].update(segmentation=[[0, 0, 11, 0, 11, 3]]), r"annotation 1 \(image 'a.png'\): polygon outside the 10x8 image"),
    (lambda d: d["annotations"][0].update(segmentation=[[0, 0, 1, float("nan"), 2, 2]]), "finite numbers"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), "annotation 1: the annotation id is used twice"),
    (lambda d: d["annotations"][0].update(image_id=99), "annotation 1: image id 99 is not in the file's images"),
    (lambda d: d["annotations"][0].update(segmentation={"size": [H, W], "counts": [3, 2]}), "RLE counts sum to 5, the image has 80"),
    (lambda d: d["annotations"][0].update(segmentation={"size": [H, W + 1], "counts": [88]}), r"RLE size \[8, 11\] is not the image's"),
    # a compressed string whose counts run far past the image: refused before pycocotools' C decoder
    (lambda d: d["annotations"][0].update(segmentation={"size": [H, W], "counts": "0" + "o" * 5 + "?"}), "RLE counts sum to 536870911, the image has 80"),
    (lambda d: d["images"][0].update(height=H + 1), "is 10x9 in the file, 10x8 in the archive"),
    (lambda d: d.pop("images"), "not a COCO instance file"),
])
def test_bad_files_name_the_annotation(change, message):
    doc = _doc([{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2]]}])
    change(doc)
    with pytest.raises(CocoError, match=message):
        _parse(doc)


def test_compressed_counts_match_pycocotools():
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    for p in (0.02, 0.5, 0.98):
        m = rng.random((37, 53)) < p
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
        counts = string_counts(enc["counts"].decode())
        assert sum(counts) == m.size and coco.mask_to_coco_rle(m)["counts"] == counts


def test_masks_file_reads_back_and_refuses_bad_rows(tmp_path, small_archive):
    arch = Archive.open(str(small_archive))
    a, b, c = arch.image_ids[:3]
    mask = np.zeros((64, 400), bool)
    mask[10:20, 50:90] = True
    path = tmp_path / "masks.csv"
    path.write_text(masks_csv({a: {2: rle.encode(mask)}, b: {}}, arch.class_ids))
    tm = read_true_masks(str(path), arch)
    assert tm.image_ids == sorted([a, b]) and tm.positives == 1
    assert tm.rle_row(a, arch.class_ids) == ["", rle.encode(mask), "", ""] and tm.rle_row(b, arch.class_ids) == [""] * 4
    assert (tm.masks(a, arch.class_ids, (64, 400))[1] == mask).all()
    for text, message in [(f"{c},9,", "ClassId 9 out of range 1..4"),
                          ("nothere.png,1,", "name images that are not in archive"),
                          (f"{c},1,\n{c},1,", "duplicate"),
                          (f"{c},1,3 x", "EncodedPixels")]:
        path.write_text("ImageId,ClassId,EncodedPixels\n" + text + "\n")
        with pytest.raises(ArchiveError, match=message):
            read_true_masks(str(path), arch)


def _truth_store(root: str, arch: Archive) -> dict:
    """A label store holding the archive's true masks (one run), as a reviewer would get them."""
    rows, truth = [], {}
    for image_id in arch.image_ids:
        masks = arch.masks(image_id, (64, 400))
        for k, c in enumerate(arch.class_ids):
            truth[(image_id, c)] = masks[k]
            rows.append({"image_id": image_id, "class_id": c, "encoded_pixels": rle.encode(masks[k]),
                         "score": 0.9 if masks[k].any() else 0.1, "area": int(masks[k].sum()), "height": 64,
                         "width": 400, "model_version": "m-1", "run_id": ""})
    commit_rows(root, rows)
    return truth


@pytest.mark.parametrize("fmt", ["rle", "polygon"])
def test_export_then_import_gives_the_masks_back(tmp_path, small_archive, fmt):
    arch = Archive.open(str(small_archive))
    truth = _truth_store(str(tmp_path / "store"), arch)
    exported = tmp_path / f"review-{fmt}.json"
    coco.export_coco(str(tmp_path / "store"), str(exported), fmt=fmt)
    out = tmp_path / "reviewed.csv"
    rc, stdout, stderr = run_cli(["import-coco", str(exported), "--archive", str(small_archive), "--out", str(out),
                                  "--unannotated", "clean"])
    assert rc == 0, stderr
    assert f"true masks of {len(arch)} reviewed image(s)" in stdout
    tm = read_true_masks(str(out), arch)
    assert tm.image_ids == arch.image_ids
    for image_id in arch.image_ids:
        got = tm.masks(image_id, arch.class_ids, (64, 400))
        for k, c in enumerate(arch.class_ids):
            want = truth[(image_id, c)]
            # RLE is exact; polygons cannot hold holes, which come back filled (as the export documents)
            assert (got[k] == (want if fmt == "rle" else ndimage.binary_fill_holes(want))).all(), (image_id, c)
    # nothing is written over: not an existing file without --force, never the archive's train.csv
    rc, _, stderr = run_cli(["import-coco", str(exported), "--archive", str(small_archive), "--out", str(out)])
    assert rc == 2 and "exists; pass --force" in stderr
    rc, _, stderr = run_cli(["import-coco", str(exported), "--archive", str(small_archive),
                             "--out", str(small_archive / "train.csv"), "--force"])
    assert rc == 2 and "the archive's own labels file" in stderr
    # without --unannotated clean, the clean images of the export are left out and said so
    rc, stdout, _ = run_cli(["import-coco", str(exported), "--archive", str(small_archive), "--out", str(out), "--force"])
    clean = sum(1 for i, d in zip(arch.image_ids, arch.defective) if not d)
    assert rc == 0 and f"{clean} image(s) without annotations left out" in stdout
    assert len(read_true_masks(str(out), arch)) == len(arch) - clean


def test_import_refuses_oversized_and_non_json_files(tmp_path, small_archive):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe not json")
    with pytest.raises(CocoError, match="not a JSON file"):
        import_coco(str(bad), str(small_archive), str(tmp_path / "m.csv"))
    bad.write_text(json.dumps(_doc([])))
    with pytest.raises(CocoError, match="larger than 10 bytes"):
        import_coco(str(bad), str(small_archive), str(tmp_path / "m.csv"), max_bytes=10)


# Datumaro (CVAT's dataset library) lives in its own venv: `make install` makes .venv/datumaro
# (requirements/datumaro.txt), since its pins clash with ours.
DATUMARO_PYTHON = Path(sys.executable).parent.parent / "datumaro" / "bin" / "python"
_DATUMARO_SCRIPT = """
import sys
import datumaro as dm

ds = dm.Dataset.import_from(sys.argv[1], "coco_instances")
ds.export(sys.argv[2], "coco_instances", save_media=False)
print(len(ds))
"""


@pytest.mark.parametrize("fmt", ["polygon", "rle"])
def test_import_reads_what_datumaro_writes_back(tmp_path, small_archive, fmt):
    """Our export, read and written again by Datumaro as CVAT does (it drops our cam2seg_* keys and
    renumbers nothing we rely on), imports to the same masks as our export itself."""
    assert DATUMARO_PYTHON.exists(), f"{DATUMARO_PYTHON} is missing: run `make install` (it makes the Datumaro venv)"
    arch = Archive.open(str(small_archive))
    _truth_store(str(tmp_path / "store"), arch)
    src = tmp_path / "export"
    (src / "images" / "default").mkdir(parents=True)  # Datumaro's COCO layout; the images are not needed
    coco.export_coco(str(tmp_path / "store"), str(src / "annotations" / "instances_default.json"), fmt=fmt)
    back = tmp_path / "datumaro"
    proc = subprocess.run([str(DATUMARO_PYTHON), "-c", _DATUMARO_SCRIPT, str(src), str(back)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == len(arch)
    written = back / "annotations" / "instances_default.json"
    doc = json.loads(written.read_text())
    assert not any(k.startswith("cam2seg_") for im in doc["images"] for k in im)  # what the file no longer says
    ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    import_coco(str(src / "annotations" / "instances_default.json"), str(small_archive), str(ours))
    summary = import_coco(str(written), str(small_archive), str(theirs))
    assert summary["images"] == sum(arch.defective) and summary["skipped"] == len(arch) - sum(arch.defective)
    assert theirs.read_text() == ours.read_text()
